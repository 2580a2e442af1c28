//! The kernel command line, as the agent reads it from /proc/cmdline.
//!
//! The agent takes its own settings from `husk.*` parameters. A dotted name
//! matters: the kernel passes plain `key=value` words it does not know to
//! /init as environment variables, but treats dotted ones as module
//! parameters and keeps them to itself, so /proc/cmdline is the only place
//! the agent can find them.

use std::{fs, io, path::Path};

use thiserror::Error;

/// Where the running kernel exposes its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// Parameter selecting the agent's log filter (`husk.log=debug`, or any
/// tracing-subscriber `EnvFilter` directive list such as
/// `husk.log=husk_agent=trace,info`).
pub const LOG_PARAM: &str = "husk.log";

#[derive(Debug, Error)]
pub enum CmdlineError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unterminated double quote starting at byte {position} of the kernel command line")]
    UnterminatedQuote { position: usize },
    #[error("kernel command line parameter {param:?} has an empty name")]
    EmptyName { param: String },
}

/// Parsed kernel parameters, in command-line order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Reads and parses the running kernel's command line.
    pub fn read() -> Result<Self, CmdlineError> {
        Self::read_from(Path::new(PROC_CMDLINE))
    }

    pub fn read_from(path: &Path) -> Result<Self, CmdlineError> {
        let bytes = fs::read(path).map_err(|source| CmdlineError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // A stray non-UTF-8 byte in some unrelated parameter must not cost
        // the agent its own settings, so decode lossily.
        Self::parse(&String::from_utf8_lossy(&bytes))
    }

    /// Splits a command line the way the kernel does: words separated by
    /// whitespace, double quotes group whitespace into a word and are
    /// removed, `name=value` or a bare `name`, and a lone `--` ends the kernel's
    /// parameters (what follows is argv for /init, not kernel settings).
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut params = Vec::new();
        for word in split_words(text)? {
            if word == "--" {
                break;
            }
            let (name, value) = match word.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (word.as_str(), None),
            };
            if name.is_empty() {
                return Err(CmdlineError::EmptyName {
                    param: word.clone(),
                });
            }
            params.push((name.to_string(), value));
        }
        Ok(Self { params })
    }

    /// The value of the last `name=value` occurrence: later parameters
    /// override earlier ones, as for the kernel's own settings, so a
    /// bootloader can append overrides.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, v)| n == name && v.is_some())
            .and_then(|(_, v)| v.as_deref())
    }

    /// Whether `name` appears at all, with or without a value.
    pub fn contains(&self, name: &str) -> bool {
        self.params.iter().any(|(n, _)| n == name)
    }
}

fn split_words(text: &str) -> Result<Vec<String>, CmdlineError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote_start: Option<usize> = None;
    for (i, c) in text.char_indices() {
        match c {
            '"' => {
                quote_start = match quote_start {
                    Some(_) => None,
                    None => Some(i),
                };
                // `""` is an empty but present word.
                in_word = true;
            }
            c if c.is_whitespace() && quote_start.is_none() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(position) = quote_start {
        return Err(CmdlineError::UnterminatedQuote { position });
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_typical_guest_cmdline() {
        let c = KernelCmdline::parse(
            "console=ttyS0 reboot=t panic=-1 quiet husk.log=debug rdinit=/init\n",
        )
        .unwrap();
        assert_eq!(c.value("console"), Some("ttyS0"));
        assert_eq!(c.value("panic"), Some("-1"));
        assert_eq!(c.value(LOG_PARAM), Some("debug"));
        assert!(c.contains("quiet"));
        assert_eq!(c.value("quiet"), None);
        assert_eq!(c.value("missing"), None);
    }

    #[test]
    fn last_occurrence_wins() {
        let c = KernelCmdline::parse("husk.log=info husk.log=trace").unwrap();
        assert_eq!(c.value(LOG_PARAM), Some("trace"));
    }

    #[test]
    fn quotes_group_words_and_are_removed() {
        let c = KernelCmdline::parse(r#"a="x y" "b=1 2" c="" d=="#).unwrap();
        assert_eq!(c.value("a"), Some("x y"));
        assert_eq!(c.value("b"), Some("1 2"));
        assert_eq!(c.value("c"), Some(""));
        assert_eq!(c.value("d"), Some("="));
    }

    #[test]
    fn value_keeps_everything_after_first_equals() {
        let c = KernelCmdline::parse("husk.log=husk_agent=trace,info").unwrap();
        assert_eq!(c.value(LOG_PARAM), Some("husk_agent=trace,info"));
    }

    #[test]
    fn double_dash_ends_kernel_params() {
        let c = KernelCmdline::parse("a=1 -- husk.log=debug").unwrap();
        assert_eq!(c.value("a"), Some("1"));
        assert_eq!(c.value(LOG_PARAM), None);
    }

    #[test]
    fn empty_and_whitespace_only() {
        assert_eq!(KernelCmdline::parse("").unwrap(), KernelCmdline::default());
        assert_eq!(
            KernelCmdline::parse(" \t\n ").unwrap(),
            KernelCmdline::default()
        );
    }

    #[test]
    fn unterminated_quote_is_an_error() {
        let err = KernelCmdline::parse(r#"a=1 b="oops"#).unwrap_err();
        assert!(matches!(
            err,
            CmdlineError::UnterminatedQuote { position: 6 }
        ));
        assert!(err.to_string().contains("unterminated"));
    }

    #[test]
    fn empty_name_is_an_error() {
        let err = KernelCmdline::parse("a=1 =2").unwrap_err();
        assert!(matches!(err, CmdlineError::EmptyName { ref param } if param == "=2"));
    }

    #[test]
    fn non_utf8_is_decoded_lossily() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmdline");
        fs::write(&path, b"x=\xff\xfe husk.log=warn\n").unwrap();
        let c = KernelCmdline::read_from(&path).unwrap();
        assert_eq!(c.value(LOG_PARAM), Some("warn"));
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = KernelCmdline::read_from(Path::new("/nonexistent/cmdline")).unwrap_err();
        assert!(matches!(err, CmdlineError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/cmdline"));
    }
}
