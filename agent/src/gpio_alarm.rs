//! The local alarm's GPIO driver: applies [`Outputs`] to the buzzer and LED lines and reports
//! presses of the silence button. Thin on purpose; the patterns are in [`crate::alarm`].

use std::time::Duration;

use embedded_hal::digital::{InputPin, OutputPin};
use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};
use linux_embedded_hal::CdevPin;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::alarm::Outputs;
use crate::config::LocalAlarmConfig;

fn output(chip: &mut Chip, line: Option<u32>) -> Option<CdevPin> {
    let line = line?;
    let handle = chip.get_line(line).and_then(|l| l.request(LineRequestFlags::OUTPUT, 0, "mamori-alarm"));
    match handle.map_err(|e| e.to_string()).and_then(|h| CdevPin::new(h).map_err(|e| e.to_string())) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(line, error = %e, "cannot drive a local alarm line");
            None
        }
    }
}

/// Drive the lines until `cancel` (runs on a blocking thread).
pub fn drive(
    cfg: &LocalAlarmConfig,
    rx: watch::Receiver<Outputs>,
    button: mpsc::Sender<()>,
    cancel: &CancellationToken,
) {
    let mut chip = match Chip::new(&cfg.chip) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(chip = %cfg.chip.display(), error = %e, "no GPIO chip: the local alarm cannot sound");
            return;
        }
    };
    let mut buzzer = output(&mut chip, cfg.buzzer_line);
    let mut red = output(&mut chip, cfg.red_led_line);
    let mut green = output(&mut chip, cfg.green_led_line);
    let mut btn = cfg.silence_button_line.and_then(|l| {
        chip.get_line(l)
            .and_then(|l| l.request(LineRequestFlags::INPUT, 0, "mamori-silence"))
            .ok()
            .and_then(|h| CdevPin::new(h).ok())
    });
    let mut was_pressed = false;
    while !cancel.is_cancelled() {
        let o = *rx.borrow();
        for (pin, on) in [(&mut buzzer, o.buzzer), (&mut red, o.red), (&mut green, o.green)] {
            if let Some(p) = pin {
                let _ = if on { p.set_high() } else { p.set_low() };
            }
        }
        if let Some(b) = &mut btn {
            let pressed = b.is_low().unwrap_or(false);
            if pressed && !was_pressed {
                let _ = button.try_send(());
            }
            was_pressed = pressed;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for pin in [&mut buzzer, &mut red, &mut green].into_iter().flatten() {
        let _ = pin.set_low();
    }
}
