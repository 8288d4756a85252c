//! The benchmarks' command lines: `--name value` pairs.
//!
//! A benchmark runs for minutes; a typo that silently ran the default (`--outage 5` for
//! `--outages 5`, `--homes 2k`) would cost those minutes and record the wrong figure. So each
//! benchmark names the arguments it takes ([`check`]), a name it does not take or one without
//! its value stops it at once, and a value that is not a number is an error naming it.

use anyhow::{bail, Result};

/// Every argument after the program's name.
fn given() -> Vec<String> {
    std::env::args().skip(1).collect()
}

/// Refuses what is not `--name value` for one of `known` (`flags` stand alone, no value).
pub fn check(known: &[&str], flags: &[&str]) -> Result<()> {
    check_in(&given(), known, flags)
}

fn check_in(args: &[String], known: &[&str], flags: &[&str]) -> Result<()> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if flags.contains(&a) {
            i += 1;
        } else if known.contains(&a) {
            if args.get(i + 1).is_none_or(|v| v.starts_with("--")) {
                bail!("{a} needs a value");
            }
            i += 2;
        } else {
            let mut takes: Vec<&str> = known.iter().chain(flags).copied().collect();
            takes.sort_unstable();
            bail!("`{a}` is not an argument of this benchmark; it takes {}", takes.join(", "));
        }
    }
    Ok(())
}

/// The numeric argument `name`, or `default` when it is not given.
pub fn arg(name: &str, default: u64) -> Result<u64> {
    num_in(&given(), name, default)
}

fn num_in(args: &[String], name: &str, default: u64) -> Result<u64> {
    match text_in(args, name) {
        None => Ok(default),
        Some(v) => match v.replace('_', "").parse() {
            Ok(n) => Ok(n),
            Err(_) => bail!("{name} {v}: not a whole number"),
        },
    }
}

/// The argument `name` as text, when given.
pub fn arg_text(name: &str) -> Option<String> {
    text_in(&given(), name)
}

fn text_in(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_known_name_with_its_value_is_taken_and_a_missing_one_is_the_default() {
        let a = v("--homes 2_000 --shapes sqlite+mosquitto --keep");
        check_in(&a, &["--homes", "--shapes", "--storm"], &["--keep"]).unwrap();
        assert_eq!(num_in(&a, "--homes", 5).unwrap(), 2000);
        assert_eq!(num_in(&a, "--storm", 5).unwrap(), 5);
        assert_eq!(text_in(&a, "--shapes").as_deref(), Some("sqlite+mosquitto"));
    }

    #[test]
    fn a_typo_a_missing_value_or_a_word_for_a_number_is_refused_by_name() {
        let e = check_in(&v("--outage 5"), &["--outages"], &[]).unwrap_err().to_string();
        assert!(e.contains("`--outage`") && e.contains("--outages"), "{e}");
        let e = check_in(&v("--outages --memory 1"), &["--outages", "--memory"], &[]).unwrap_err().to_string();
        assert!(e.contains("--outages needs a value"), "{e}");
        let e = num_in(&v("--homes 2k"), "--homes", 5).unwrap_err().to_string();
        assert!(e.contains("--homes 2k"), "{e}");
    }
}
