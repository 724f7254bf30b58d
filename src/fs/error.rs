//! Errors of the filesystem core: POSIX conditions by name, plus store failures.
//! The FUSE adapter maps them to errno values; nothing else does.

use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("no space left on the volume (quota or inode limit reached)")]
    NoSpace,
    #[error("file too large")]
    FileTooBig,
    #[error("invalid argument")]
    Invalid,
    #[error("no such attribute")]
    NoData,
    #[error("result does not fit the buffer")]
    Range,
    #[error("attribute value too large")]
    TooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("operation not permitted")]
    Perm,
    #[error("too many links")]
    TooManyLinks,
    #[error("no data past this offset")]
    NoDataPastOffset,
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<rocksdb::Error> for FsError {
    fn from(e: rocksdb::Error) -> Self {
        FsError::Store(store::Error::Db(e))
    }
}

impl From<store::codec::RecordError> for FsError {
    fn from(e: store::codec::RecordError) -> Self {
        FsError::Store(e.into())
    }
}

impl From<store::codec::KeyError> for FsError {
    fn from(e: store::codec::KeyError) -> Self {
        FsError::Store(e.into())
    }
}

impl FsError {
    /// The errno a caller of the system call sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::FileTooBig => libc::EFBIG,
            FsError::Invalid => libc::EINVAL,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::Perm => libc::EPERM,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoDataPastOffset => libc::ENXIO,
            FsError::Store(e) if e.is_out_of_space() => libc::ENOSPC,
            FsError::Store(_) => libc::EIO,
        }
    }
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;
