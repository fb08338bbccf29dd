//! The one error type of the core. Every kernel validates what it reads and returns
//! `CoreError` instead of panicking, so a bad tensor becomes a Python exception.

use std::fmt;

/// Why a kernel refused its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// An argument has the wrong size, a value out of range, or an unsupported option.
    /// `argument` is the name the Python API uses, so the message can be shown as is.
    InvalidArgument { argument: &'static str, expected: String, got: String },
}

pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    pub fn invalid(argument: &'static str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        CoreError::InvalidArgument { argument, expected: expected.into(), got: got.into() }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument { argument, expected, got } => {
                write!(f, "{argument}: expected {expected}, got {got}")
            }
        }
    }
}

impl std::error::Error for CoreError {}

/// Checks that a buffer holds exactly `expected` elements.
pub(crate) fn check_len<T>(argument: &'static str, data: &[T], expected: usize) -> Result<()> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(CoreError::invalid(argument, format!("{expected} elements"), format!("{}", data.len())))
    }
}
