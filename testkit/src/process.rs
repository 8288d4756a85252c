//! Child processes for the scenarios: the agent, the simulator, and an MQTT collector.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::Deadline;

/// A child process whose standard error (JSON log lines, or anything) is kept in memory and
/// can be waited on. Killed when dropped.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdin: Option<ChildStdin>,
    name: String,
}

impl Process {
    /// Spawn `cmd`, capturing its stdout and stderr lines.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Process> {
        use std::os::unix::process::CommandExt;
        // Its own process group, so that killing it also kills anything it forked.
        cmd.process_group(0);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                }
            });
        }
        let stdin = child.stdin.take();
        Ok(Process { child, lines, stdin, name: name.to_string() })
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wait until a line satisfies `pred`; returns it.
    pub fn wait_line(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Deadline::after(limit);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if deadline.check(what).is_err() {
                bail!("{}: timed out waiting for {what}; its output:\n{}", self.name, self.lines().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Write a line to its standard input.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Kill it and its process group without warning (SIGKILL) and wait.
    pub fn kill9(&mut self) -> Result<()> {
        let _ =
            Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).stderr(Stdio::null()).status();
        self.child.kill().ok();
        self.child.wait()?;
        Ok(())
    }

    /// Stop it with SIGTERM and wait up to `limit`; returns its exit code.
    pub fn terminate(&mut self, limit: Duration) -> Result<Option<i32>> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Deadline::after(limit);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            deadline.check("the process to exit after SIGTERM")?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send it a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) -> Result<()> {
        let ok = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status()?.success();
        anyhow::ensure!(ok, "{}: kill -{name} failed", self.name);
        Ok(())
    }

    /// Wait up to `limit` for it to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let deadline = Deadline::after(limit);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if deadline.check("the process to exit").is_err() {
                bail!("{}: still running; its output:\n{}", self.name, self.lines().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// `mamori-agent simulate`, driven through its standard input.
pub struct Simulator {
    /// The process.
    pub process: Process,
    /// Where the device links are.
    pub dir: PathBuf,
    sent: usize,
}

impl Simulator {
    /// Start the simulator binary `bin` with `devices` under `dir`, and wait until it is ready.
    pub fn start(bin: &Path, dir: &Path, devices: &str, scenario: &str) -> Result<Simulator> {
        let mut cmd = Command::new(bin);
        cmd.args(["simulate", "--devices", devices, "--scenario", scenario, "--dir"]).arg(dir);
        let process = Process::spawn("simulator", cmd)?;
        process.wait_line("the simulator to be ready", Duration::from_secs(10), |l| l == "ready")?;
        Ok(Simulator { process, dir: dir.to_path_buf(), sent: 0 })
    }

    /// Apply a command and wait for the simulator to acknowledge it.
    pub fn cmd(&mut self, command: &str) -> Result<()> {
        self.process.send(command)?;
        self.sent += 1;
        let want = format!("ok {command}");
        let n = self.sent;
        // Acknowledgements arrive in order; wait for the n-th `ok`/`error` line.
        let deadline = Deadline::after(Duration::from_secs(5));
        loop {
            let acks: Vec<String> =
                self.process.lines().into_iter().filter(|l| l.starts_with("ok ") || l.starts_with("error ")).collect();
            if acks.len() >= n {
                if acks[n - 1] == want {
                    return Ok(());
                }
                bail!("simulator refused `{command}`: {}", acks[n - 1]);
            }
            deadline.check(&format!("the simulator to apply `{command}`"))?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The path of a device link.
    pub fn device(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// One message a [`Collector`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Whether it was a retained message.
    pub retain: bool,
    /// When it arrived.
    pub at: Instant,
}

/// An MQTT subscriber on its own thread and runtime that records every message. It uses a
/// persistent session (clean session off), so messages published while it is reconnecting
/// after a broker restart are still delivered to it.
///
/// rumqttc's `EventLoop::poll` is not cancel-safe (a poll dropped mid-read can lose bytes), so
/// the loop never wraps it in a timeout; it is stopped by a DISCONNECT request instead.
pub struct Collector {
    messages: Arc<Mutex<Vec<Received>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    client: rumqttc::AsyncClient,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Subscribe to `filter` on the broker at 127.0.0.1:`port` and wait for the SUBACK.
    pub fn start(port: u16, client_id: &str, filter: &str) -> Result<Collector> {
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 64);
        let (m, s, c, f) = (messages.clone(), stop.clone(), client.clone(), filter.to_string());
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let mut ready = Some(ready_tx);
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                            if !ack.session_present {
                                let _ = c.subscribe(f.clone(), rumqttc::QoS::AtLeastOnce).await;
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            #[allow(clippy::disallowed_methods)] // the harness is an I/O edge
                            let at = Instant::now();
                            m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Received {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                at,
                            });
                        }
                        Ok(_) => {}
                        // Reconnect after a pause (the broker may be restarting).
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).context("the collector's subscription")?;
        Ok(Collector { messages, stop, client, thread: Some(thread) })
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wait until the messages satisfy `pred`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Received]) -> bool) -> Result<Vec<Received>> {
        let deadline = Deadline::after(limit);
        loop {
            let m = self.messages();
            if pred(&m) {
                return Ok(m);
            }
            if deadline.check(what).is_err() {
                let summary: Vec<String> =
                    m.iter().map(|r| format!("{} {}", r.topic, String::from_utf8_lossy(&r.payload))).collect();
                bail!("timed out waiting for {what}; received:\n{}", summary.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the loop; if the broker is gone the loop's next error ends it too.
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
