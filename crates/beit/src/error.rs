//! One error type for the library: every variant says which file, tensor or field, and what was expected
//! against what was found.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, BeitError>;

#[derive(Debug, thiserror::Error)]
pub enum BeitError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },

    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },

    #[error("{path}: field `{field}`: {message}")]
    ConfigFile { path: PathBuf, field: String, message: String },

    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("{path}: tensor `{name}` is missing from the checkpoint")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{what}: {message}")]
    Input { what: String, message: String },

    #[error("{path}: {message}")]
    Npy { path: PathBuf, message: String },

    #[error(transparent)]
    Pickle(#[from] crate::checkpoint::pickle::PickleError),

    #[error(transparent)]
    Msgpack(#[from] crate::checkpoint::msgpack::MsgpackError),

    #[error(transparent)]
    Processor(#[from] crate::processor::ProcessorError),

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl BeitError {
    pub fn input(what: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Input { what: what.into(), message: message.into() }
    }

    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Config { field: field.into(), message: message.into() }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        BeitError::Checkpoint { path: path.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BeitError::Io { path: path.into(), source }
    }
}
