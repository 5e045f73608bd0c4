use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's attempt no longer holds the job (its lease was taken over, or the job is
    /// already terminal). The caller must drop its result.
    #[error("job {id}: attempt {attempt} no longer holds the job")]
    Fenced { id: String, attempt: u32 },
    #[error("idempotency key reused with a different request (first used for job {existing})")]
    IdempotencyConflict { existing: String },
    #[error("job {0} not found")]
    NotFound(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("stored data is invalid: {0}")]
    Invalid(String),
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io { path: path.display().to_string(), source }
    }
}
