//! One error type for the library: every variant says which file, tensor or field, and what was expected
//! against what was found. [`BeitError::kind`] sorts them by what a caller can do about them.

use std::path::PathBuf;

/// The library's result type.
pub type Result<T> = std::result::Result<T, BeitError>;

/// What a caller can do about an error: the split a server needs between a 4xx and a 5xx, or a CLI between
/// "fix your input" and "report a bug".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller's input is wrong: an argument, a tensor, a config field, an image's size. Fix it and retry.
    InvalidInput,
    /// The model cannot do what was asked (a task its head lacks, saving a model prepared for inference).
    Unsupported,
    /// A file or the Hub could not be read or written (the operating system or the network said no).
    Io,
    /// A file was read but is not what it claims to be: a corrupt image, a checkpoint with missing or misshapen
    /// tensors, invalid JSON.
    Format,
    /// Training stopped because the loss stopped being a finite number.
    Diverged,
    /// A bug in beit-rs: an internal invariant did not hold. The message says where.
    Internal,
}

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum BeitError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },

    /// A JSON file did not parse.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the line and column.
        message: String,
    },

    /// A config value is out of its domain (a config built in code, or one already parsed).
    #[error("config field `{field}`: {message}")]
    Config {
        /// The field's name, as in config.json.
        field: String,
        /// What was expected against what was found.
        message: String,
    },

    /// A config file has a field of the wrong type or value.
    #[error("{path}: field `{field}`: {message}")]
    ConfigFile {
        /// The config file.
        path: PathBuf,
        /// The field's name.
        field: String,
        /// What was expected against what was found.
        message: String,
    },

    /// A checkpoint file cannot be used as a whole (wrong format, no tensors, an unsafe pickle, ...).
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's name as the checkpoint would spell it.
        name: String,
    },

    /// A tensor in the checkpoint has another shape than the config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's name as the checkpoint spells it.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },

    /// An argument, tensor or value the caller passed is wrong.
    #[error("{what}: {message}")]
    InvalidInput {
        /// Which argument, tensor, file or field.
        what: String,
        /// What was expected against what was found.
        message: String,
    },

    /// The model cannot do what was asked.
    #[error("{what}: {message}")]
    Unsupported {
        /// What was asked (a task, an option).
        what: String,
        /// Why this model cannot do it, and what would.
        message: String,
    },

    /// A `.npy` file is malformed or holds another dtype or shape than expected.
    #[error("{path}: {message}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Training produced a loss that is not a finite number.
    #[error("training diverged: the loss became {value} at epoch {epoch}, batch {batch}; a lower learning rate may help")]
    Diverged {
        /// The epoch (1-based, as the progress lines and metrics.jsonl count).
        epoch: usize,
        /// The batch within the epoch (0-based).
        batch: usize,
        /// The loss (NaN or infinite).
        value: f64,
    },

    /// A bug: an internal invariant did not hold.
    #[error("internal error in {what}: {message} (this is a bug in beit-rs)")]
    Internal {
        /// Where.
        what: String,
        /// What did not hold.
        message: String,
    },

    /// A PyTorch pickle (`.bin`, `.pkl`) could not be read safely.
    #[error(transparent)]
    Pickle(#[from] crate::checkpoint::pickle::PickleError),

    /// A Flax msgpack checkpoint could not be read.
    #[error(transparent)]
    Msgpack(#[from] crate::checkpoint::msgpack::MsgpackError),

    /// An image or processor config could not be read or processed.
    #[error(transparent)]
    Processor(#[from] crate::processor::ProcessorError),

    /// A tensor operation failed: the library checks shapes before calling candle, so this is a bug.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl BeitError {
    /// What the caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        use BeitError::*;
        match self {
            Io { .. } => ErrorKind::Io,
            Json { .. } | ConfigFile { .. } | Checkpoint { .. } | MissingTensor { .. } | ShapeMismatch { .. } => {
                ErrorKind::Format
            }
            Npy { .. } | Pickle(_) | Msgpack(_) => ErrorKind::Format,
            Config { .. } | InvalidInput { .. } => ErrorKind::InvalidInput,
            Unsupported { .. } => ErrorKind::Unsupported,
            Diverged { .. } => ErrorKind::Diverged,
            Internal { .. } | Candle(_) => ErrorKind::Internal,
            Processor(e) => e.kind(),
        }
    }

    /// The caller passed something wrong: `what` names it, `message` says what was expected and found.
    pub fn invalid_input(what: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::InvalidInput { what: what.into(), message: message.into() }
    }

    /// The model cannot do `what`.
    pub fn unsupported(what: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Unsupported { what: what.into(), message: message.into() }
    }

    /// A bug: an invariant of `what` did not hold.
    pub fn internal(what: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Internal { what: what.into(), message: message.into() }
    }

    /// A config value out of its domain.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        BeitError::Config { field: field.into(), message: message.into() }
    }

    /// A checkpoint that cannot be used.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        BeitError::Checkpoint { path: path.into(), message: message.into() }
    }

    /// A file the operating system would not read or write.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BeitError::Io { path: path.into(), source }
    }
}
