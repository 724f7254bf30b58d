//! Randomized differential test: one seeded sequence of file operations is applied to a
//! fusevol mount and to a plain directory on the local disk (ext4); every operation must give
//! the same result (the same value, or the same errno) on both, and at the end (and again after
//! a remount) both trees must be identical in names, types, sizes, modes, link counts, hard-link
//! structure, contents, symlink targets and user xattrs.
//!
//! Names come from a small pool so that operations collide and fail in interesting ways.
//! Seed and length: `FUSEVOL_DIFF_SEED` (decimal or 0x-hex) and `FUSEVOL_DIFF_OPS`
//! (default 2000). Longer runs by hand, e.g.
//! `FUSEVOL_DIFF_SEED=$RANDOM FUSEVOL_DIFF_OPS=50000 cargo test --release --test differential`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Create {
        p: String,
        mode: u32,
        excl: bool,
        trunc: bool,
    },
    Write {
        p: String,
        off: u64,
        len: usize,
        seed: u64,
        append: bool,
    },
    Truncate {
        p: String,
        len: u64,
    },
    Read {
        p: String,
        off: u64,
        len: usize,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Unlink {
        p: String,
    },
    Mkdir {
        p: String,
        mode: u32,
    },
    Rmdir {
        p: String,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        p: String,
    },
    Readlink {
        p: String,
    },
    Chmod {
        p: String,
        mode: u32,
    },
    SetXattr {
        p: String,
        name: String,
        value: Vec<u8>,
        flags: i32,
    },
    RemoveXattr {
        p: String,
        name: String,
    },
    GetXattr {
        p: String,
        name: String,
    },
    ListXattr {
        p: String,
    },
    Stat {
        p: String,
    },
    ReadDir {
        p: String,
    },
    /// fsync + drop the page cache, so that later reads come from the filesystem.
    Sync {
        p: String,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Val {
    Unit,
    Bytes(Vec<u8>),
    /// (file type bits, full mode, size (None for directories), nlink)
    Stat(u32, u32, Option<u64>, u64),
    Names(Vec<String>),
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Bytes(b) if b.len() > 64 => write!(f, "Bytes(len {}, {:?}...)", b.len(), &b[..32]),
            v => write!(f, "{v:?}"),
        }
    }
}

type Res = Result<Val, String>;

fn show(r: &Res) -> String {
    match r {
        Ok(v) => format!("Ok({v})"),
        Err(e) => format!("Err({e})"),
    }
}

struct Profile {
    names: &'static [&'static str],
    max_depth: usize,
    /// Writes and truncates stay below this offset.
    span: u64,
    max_write: usize,
}

const META_HEAVY: Profile = Profile {
    names: &["a", "b", "c", "d"],
    max_depth: 3,
    span: 200_000,
    max_write: 70_000,
};
const DATA_HEAVY: Profile = Profile {
    names: &["a", "b"],
    max_depth: 2,
    span: 1_200_000,
    max_write: 300_000,
};

const XNAMES: &[&str] = &["user.x", "user.y", "user.zzz"];
const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o700, 0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o640,
];

/// Entries currently in the reference tree, to aim operations at things that exist.
struct Existing {
    all: Vec<String>,
    dirs: Vec<String>,
    /// Everything that is not a directory.
    files: Vec<String>,
}

fn existing_entries(root: &Path) -> Existing {
    let mut ex = Existing {
        all: vec![],
        dirs: vec![],
        files: vec![],
    };
    fn walk(root: &Path, rel: &str, ex: &mut Existing) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let Ok(rd) = fs::read_dir(&dir) else { return };
        let mut names: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            ex.all.push(r.clone());
            if lstat(&root.join(&r)).is_dir() {
                ex.dirs.push(r.clone());
                walk(root, &r, ex);
            } else {
                ex.files.push(r.clone());
            }
        }
    }
    walk(root, "", &mut ex);
    ex
}

/// What kind of path an operation wants.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    /// An existing non-directory.
    File,
    /// An existing directory.
    Dir,
    /// Any existing entry.
    Any,
    /// A name that probably does not exist yet.
    New,
}

/// A path: mostly what `want` asks for, sometimes a new name in an existing directory or a
/// random path from the name pool (which may not exist, or have missing parents), so that
/// operations also fail in every way.
fn rpath(rng: &mut SmallRng, pr: &Profile, ex: &Existing, want: Want) -> String {
    let name = |rng: &mut SmallRng| pr.names[rng.gen_range(0..pr.names.len())];
    let roll = rng.gen_range(0..100);
    let pool = match want {
        Want::File => &ex.files,
        Want::Dir => &ex.dirs,
        _ => &ex.all,
    };
    let p_pool = if want == Want::New { 15 } else { 65 };
    if roll < p_pool && !pool.is_empty() {
        return pool[rng.gen_range(0..pool.len())].clone();
    }
    if roll < 80 && !ex.dirs.is_empty() {
        let d = &ex.dirs[rng.gen_range(0..ex.dirs.len())];
        if d.matches('/').count() + 1 < pr.max_depth {
            return format!("{d}/{}", name(rng));
        }
    }
    let depth = match rng.gen_range(0..10) {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    }
    .min(pr.max_depth);
    (0..depth).map(|_| name(rng)).collect::<Vec<_>>().join("/")
}

fn roffset(rng: &mut SmallRng, pr: &Profile) -> u64 {
    if rng.gen_bool(0.3) {
        // Near a 64 KiB chunk boundary.
        let b = rng.gen_range(0..=pr.span / 65536) * 65536;
        (b + rng.gen_range(0..16)).saturating_sub(8)
    } else {
        rng.gen_range(0..pr.span)
    }
}

fn gen_op(rng: &mut SmallRng, pr: &Profile, ex: &Existing) -> Op {
    let kind = rng.gen_range(0..100);
    let want = match kind {
        // create, mkdir, symlink
        0..=11 if rng.gen_bool(0.4) => Want::File,
        0..=11 | 57..=63 | 72..=74 => Want::New,
        // write, truncate, read, unlink, readlink, sync
        12..=41 | 51..=56 | 75 | 97..=99 => Want::File,
        // rmdir, readdir
        64..=67 | 94..=96 => Want::Dir,
        _ => Want::Any,
    };
    let p = rpath(rng, pr, ex, want);
    let to_want = if rng.gen_bool(0.4) {
        Want::Any
    } else {
        Want::New
    };
    match kind {
        0..=11 => Op::Create {
            p,
            mode: MODES[rng.gen_range(0..MODES.len())],
            excl: rng.gen_bool(0.3),
            trunc: rng.gen_bool(0.2),
        },
        12..=27 => {
            let len = if rng.gen_bool(0.2) {
                rng.gen_range(1..=pr.max_write)
            } else {
                rng.gen_range(1..5000)
            };
            Op::Write {
                p,
                off: roffset(rng, pr),
                len,
                seed: rng.gen(),
                append: rng.gen_bool(0.15),
            }
        }
        28..=33 => Op::Truncate {
            p,
            len: if rng.gen_bool(0.3) {
                0
            } else {
                roffset(rng, pr)
            },
        },
        34..=41 => Op::Read {
            p,
            off: roffset(rng, pr),
            len: rng.gen_range(1..pr.max_write * 2),
        },
        42..=50 => {
            let flags = match rng.gen_range(0..10) {
                0 | 1 => libc::RENAME_NOREPLACE,
                2 | 3 => libc::RENAME_EXCHANGE,
                _ => 0,
            };
            Op::Rename {
                from: p,
                to: rpath(rng, pr, ex, to_want),
                flags,
            }
        }
        51..=56 => Op::Unlink { p },
        57..=63 => Op::Mkdir {
            p,
            mode: [0o755, 0o700, 0o777, 0o2775, 0o1777][rng.gen_range(0..5)],
        },
        64..=67 => Op::Rmdir { p },
        68..=71 => {
            let to_want = if rng.gen_bool(0.2) {
                Want::Any
            } else {
                Want::New
            };
            Op::Link {
                from: p,
                to: rpath(rng, pr, ex, to_want),
            }
        }
        72..=74 => Op::Symlink {
            target: rpath(rng, pr, ex, Want::Any),
            p,
        },
        75 => Op::Readlink { p },
        76..=79 => Op::Chmod {
            p,
            mode: MODES[rng.gen_range(0..MODES.len())],
        },
        80..=83 => {
            let flags = match rng.gen_range(0..4) {
                0 => libc::XATTR_CREATE,
                1 => libc::XATTR_REPLACE,
                _ => 0,
            };
            let len = rng.gen_range(0..40);
            let value = pattern(rng.gen(), len);
            Op::SetXattr {
                p,
                name: XNAMES[rng.gen_range(0..XNAMES.len())].into(),
                value,
                flags,
            }
        }
        84..=85 => Op::RemoveXattr {
            p,
            name: XNAMES[rng.gen_range(0..XNAMES.len())].into(),
        },
        86..=87 => Op::GetXattr {
            p,
            name: XNAMES[rng.gen_range(0..XNAMES.len())].into(),
        },
        88 => Op::ListXattr { p },
        89..=93 => Op::Stat { p },
        94..=96 => Op::ReadDir {
            p: if rng.gen_bool(0.3) { String::new() } else { p },
        },
        _ => Op::Sync { p },
    }
}

// ---------------------------------------------------------------------------------------------
// Applying an operation to a tree
// ---------------------------------------------------------------------------------------------

fn c(root: &Path, rel: &str) -> CString {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    cstr(p)
}

fn err() -> String {
    errname(errno())
}

fn chk(r: libc::c_int) -> Result<libc::c_int, String> {
    if r < 0 {
        Err(err())
    } else {
        Ok(r)
    }
}

fn chk_s(r: isize) -> Result<usize, String> {
    if r < 0 {
        Err(err())
    } else {
        Ok(r as usize)
    }
}

/// Open, run `f` on the descriptor, close (reporting close errors as well).
fn with_fd(path: &CString, flags: i32, mode: u32, f: impl FnOnce(i32) -> Res) -> Res {
    let fd = chk(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    let r = f(fd);
    let cr = unsafe { libc::close(fd) };
    let r = r?;
    if cr < 0 {
        return Err(err());
    }
    Ok(r)
}

fn apply(root: &Path, op: &Op) -> Res {
    unsafe {
        match op {
            Op::Create {
                p,
                mode,
                excl,
                trunc,
            } => {
                let mut fl = libc::O_CREAT | libc::O_WRONLY;
                if *excl {
                    fl |= libc::O_EXCL;
                }
                if *trunc {
                    fl |= libc::O_TRUNC;
                }
                with_fd(&c(root, p), fl, *mode, |_| Ok(Val::Unit))
            }
            Op::Write {
                p,
                off,
                len,
                seed,
                append,
            } => {
                let data = pattern(*seed, *len);
                let fl = libc::O_WRONLY | if *append { libc::O_APPEND } else { 0 };
                with_fd(&c(root, p), fl, 0, |fd| {
                    let mut done = 0usize;
                    while done < data.len() {
                        let rest = &data[done..];
                        let n = if *append {
                            libc::write(fd, rest.as_ptr() as *const _, rest.len())
                        } else {
                            libc::pwrite(
                                fd,
                                rest.as_ptr() as *const _,
                                rest.len(),
                                (*off + done as u64) as i64,
                            )
                        };
                        done += chk_s(n)?;
                    }
                    Ok(Val::Unit)
                })
            }
            Op::Truncate { p, len } => {
                let cp = c(root, p);
                chk(libc::truncate(cp.as_ptr(), *len as i64)).map(|_| Val::Unit)
            }
            Op::Read { p, off, len } => with_fd(&c(root, p), libc::O_RDONLY, 0, |fd| {
                let mut buf = vec![0u8; *len];
                let mut done = 0usize;
                while done < *len {
                    let n = chk_s(libc::pread(
                        fd,
                        buf[done..].as_mut_ptr() as *mut _,
                        *len - done,
                        (*off + done as u64) as i64,
                    ))?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(Val::Bytes(buf))
            }),
            Op::Rename { from, to, flags } => {
                let (a, b) = (c(root, from), c(root, to));
                chk(libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    *flags,
                ))
                .map(|_| Val::Unit)
            }
            Op::Unlink { p } => {
                let cp = c(root, p);
                chk(libc::unlink(cp.as_ptr())).map(|_| Val::Unit)
            }
            Op::Mkdir { p, mode } => {
                let cp = c(root, p);
                chk(libc::mkdir(cp.as_ptr(), *mode)).map(|_| Val::Unit)
            }
            Op::Rmdir { p } => {
                let cp = c(root, p);
                chk(libc::rmdir(cp.as_ptr())).map(|_| Val::Unit)
            }
            Op::Link { from, to } => {
                let (a, b) = (c(root, from), c(root, to));
                chk(libc::link(a.as_ptr(), b.as_ptr())).map(|_| Val::Unit)
            }
            Op::Symlink { target, p } => {
                let t = CString::new(target.as_str()).unwrap();
                let cp = c(root, p);
                chk(libc::symlink(t.as_ptr(), cp.as_ptr())).map(|_| Val::Unit)
            }
            Op::Readlink { p } => {
                let cp = c(root, p);
                let mut buf = vec![0u8; 4096];
                let n = chk_s(libc::readlink(
                    cp.as_ptr(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                ))?;
                buf.truncate(n);
                Ok(Val::Bytes(buf))
            }
            Op::Chmod { p, mode } => {
                let cp = c(root, p);
                chk(libc::chmod(cp.as_ptr(), *mode)).map(|_| Val::Unit)
            }
            Op::SetXattr {
                p,
                name,
                value,
                flags,
            } => {
                let (cp, n) = (c(root, p), CString::new(name.as_str()).unwrap());
                let v = value.as_ptr() as *const libc::c_void;
                chk(libc::setxattr(
                    cp.as_ptr(),
                    n.as_ptr(),
                    v,
                    value.len(),
                    *flags,
                ))
                .map(|_| Val::Unit)
            }
            Op::RemoveXattr { p, name } => {
                let (cp, n) = (c(root, p), CString::new(name.as_str()).unwrap());
                chk(libc::removexattr(cp.as_ptr(), n.as_ptr())).map(|_| Val::Unit)
            }
            Op::GetXattr { p, name } => {
                let (cp, n) = (c(root, p), CString::new(name.as_str()).unwrap());
                let mut buf = vec![0u8; 4096];
                let r = chk_s(libc::getxattr(
                    cp.as_ptr(),
                    n.as_ptr(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                ))?;
                buf.truncate(r);
                Ok(Val::Bytes(buf))
            }
            Op::ListXattr { p } => {
                let cp = c(root, p);
                let mut buf = vec![0u8; 4096];
                let r = chk_s(libc::listxattr(
                    cp.as_ptr(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                ))?;
                buf.truncate(r);
                Ok(Val::Names(user_xattr_names(&buf)))
            }
            Op::Stat { p } => {
                let cp = c(root, p);
                let mut st: libc::stat = std::mem::zeroed();
                chk(libc::lstat(cp.as_ptr(), &mut st))?;
                let kind = st.st_mode & libc::S_IFMT;
                let size = if kind == libc::S_IFDIR {
                    None
                } else {
                    Some(st.st_size as u64)
                };
                Ok(Val::Stat(kind, st.st_mode, size, st.st_nlink))
            }
            Op::ReadDir { p } => {
                let path = if p.is_empty() {
                    root.to_path_buf()
                } else {
                    root.join(p)
                };
                let rd =
                    fs::read_dir(&path).map_err(|e| errname(e.raw_os_error().unwrap_or(-1)))?;
                let mut names = vec![];
                for e in rd {
                    let e = e.map_err(|e| errname(e.raw_os_error().unwrap_or(-1)))?;
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
                names.sort();
                Ok(Val::Names(names))
            }
            Op::Sync { p } => with_fd(&c(root, p), libc::O_RDONLY, 0, |fd| {
                chk(libc::fsync(fd))?;
                let r = libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
                if r != 0 {
                    return Err(errname(r));
                }
                Ok(Val::Unit)
            }),
        }
    }
}

fn user_xattr_names(buf: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| s.starts_with(b"user."))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Comparing whole trees
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: u32,
    mode: u32,
    nlink: u64,
    size: Option<u64>,
    /// File contents, or symlink target.
    content: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

struct Tree {
    entries: BTreeMap<String, Entry>,
    /// Groups of paths that are the same inode (only groups of 2 or more).
    link_groups: BTreeSet<Vec<String>>,
}

fn scan(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    fn walk(
        root: &Path,
        rel: &str,
        entries: &mut BTreeMap<String, Entry>,
        by_ino: &mut BTreeMap<u64, Vec<String>>,
    ) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let p = root.join(&r);
            let md = lstat(&p);
            let kind = md.mode() & libc::S_IFMT;
            let content = match kind {
                libc::S_IFREG => {
                    Some(fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
                }
                libc::S_IFLNK => Some(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                _ => None,
            };
            let mut xattrs = BTreeMap::new();
            if kind != libc::S_IFLNK {
                for n in llistxattr(&p)
                    .unwrap()
                    .into_iter()
                    .filter(|n| n.starts_with("user."))
                {
                    xattrs.insert(n.clone(), lgetxattr(&p, &n).unwrap());
                }
            }
            if kind != libc::S_IFDIR {
                by_ino.entry(md.ino()).or_default().push(r.clone());
            }
            entries.insert(
                r.clone(),
                Entry {
                    kind,
                    mode: md.mode(),
                    nlink: md.nlink(),
                    size: if kind == libc::S_IFDIR {
                        None
                    } else {
                        Some(md.len())
                    },
                    content,
                    xattrs,
                },
            );
            if kind == libc::S_IFDIR {
                walk(root, &r, entries, by_ino);
            }
        }
    }
    walk(root, "", &mut entries, &mut by_ino);
    let link_groups = by_ino.into_values().filter(|g| g.len() > 1).collect();
    Tree {
        entries,
        link_groups,
    }
}

fn compare_trees(fuse: &Path, reference: &Path, ctx: &str) {
    let a = scan(fuse);
    let b = scan(reference);
    let names_a: BTreeSet<_> = a.entries.keys().collect();
    let names_b: BTreeSet<_> = b.entries.keys().collect();
    assert!(
        names_a == names_b,
        "{ctx}: trees differ in names\n only in fusevol: {:?}\n only in reference: {:?}",
        names_a.difference(&names_b).collect::<Vec<_>>(),
        names_b.difference(&names_a).collect::<Vec<_>>()
    );
    for (name, ea) in &a.entries {
        let eb = &b.entries[name];
        assert_eq!(ea.kind, eb.kind, "{ctx}: type of {name}");
        assert_eq!(
            ea.mode, eb.mode,
            "{ctx}: mode of {name}: fusevol {:o}, reference {:o}",
            ea.mode, eb.mode
        );
        assert_eq!(ea.nlink, eb.nlink, "{ctx}: nlink of {name}");
        assert_eq!(ea.size, eb.size, "{ctx}: size of {name}");
        if ea.content != eb.content {
            let (ca, cb) = (
                ea.content.as_deref().unwrap_or(&[]),
                eb.content.as_deref().unwrap_or(&[]),
            );
            let at = ca.iter().zip(cb).position(|(x, y)| x != y);
            panic!(
                "{ctx}: content of {name} differs (lengths {} vs {}, first difference at {at:?})",
                ca.len(),
                cb.len()
            );
        }
        assert_eq!(ea.xattrs, eb.xattrs, "{ctx}: xattrs of {name}");
    }
    assert_eq!(
        a.link_groups, b.link_groups,
        "{ctx}: hard-link structure differs"
    );
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => {
            let s = s.trim();
            let v = if let Some(h) = s.strip_prefix("0x") {
                u64::from_str_radix(h, 16)
            } else {
                s.parse()
            };
            v.unwrap_or_else(|_| panic!("{name}={s:?} is not a number"))
        }
        Err(_) => default,
    }
}

fn run(profile: &Profile, seed: u64) {
    let ops = env_u64("FUSEVOL_DIFF_OPS", 2000);
    let repro = format!("reproduce with FUSEVOL_DIFF_SEED={seed} FUSEVOL_DIFF_OPS={ops}");
    eprintln!("differential: seed {seed}, {ops} operations ({repro})");
    let m = Mount::start(Opts::new());
    let reference_dir = tempfile::Builder::new()
        .prefix("fusevol-diff-ref-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let reference = reference_dir.path().canonicalize().unwrap();
    let fstype = unsafe {
        let cref = cstr(&reference);
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(cref.as_ptr(), &mut s);
        s.f_type
    };
    if fstype != 0xEF53 {
        eprintln!("warning: the reference directory is not on ext4 (f_type {fstype:#x})");
    }
    let fuse: PathBuf = m.mnt().to_path_buf();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut history: Vec<String> = vec![];
    let mut errors = 0usize;
    let mut stats: BTreeMap<String, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for i in 0..ops {
        let ex = existing_entries(&reference);
        let op = gen_op(&mut rng, profile, &ex);
        let ra = apply(&fuse, &op);
        let rb = apply(&reference, &op);
        history.push(format!("#{i}: {op:?} -> {}", show(&rb)));
        let kind = format!("{op:?}")
            .split([' ', '{'])
            .next()
            .unwrap()
            .to_string();
        let entry = stats.entry(kind).or_insert((0usize, BTreeMap::new()));
        match &rb {
            Ok(_) => entry.0 += 1,
            Err(e) => *entry.1.entry(e.clone()).or_insert(0usize) += 1,
        }
        if ra.is_err() {
            errors += 1;
        }
        if ra != rb {
            let tail = history[history.len().saturating_sub(15)..].join("\n");
            panic!(
                "operation #{i} differs ({repro})\n  op: {op:?}\n  fusevol:   {}\n  reference: {}\nlast operations (reference results):\n{tail}",
                show(&ra),
                show(&rb)
            );
        }
        if i % 250 == 249 {
            compare_trees(
                &fuse,
                &reference,
                &format!("after operation #{i} ({repro})"),
            );
        }
    }
    eprintln!("differential: {errors} of {ops} operations failed identically on both trees");
    for (kind, (ok, errs)) in &stats {
        eprintln!("  {kind:12} ok {ok:5}  errors {errs:?}");
    }
    assert!(
        errors > ops as usize / 20,
        "too few colliding operations ({errors}); the name pool is too large"
    );
    assert!(
        errors < ops as usize * 9 / 10,
        "almost every operation failed ({errors}); the test does nothing"
    );
    compare_trees(&fuse, &reference, &format!("at the end ({repro})"));
    // Everything must also survive a remount.
    let dirs = m.stop();
    let m = Mount::start_in(dirs, Opts::new());
    compare_trees(m.mnt(), &reference, &format!("after remount ({repro})"));
    let dirs = m.stop();
    fsck(&dirs.data, &[]).code_is(0);
}

const DEFAULT_SEED: u64 = 0x5EED_F05E_2024;

#[test]
fn random_metadata_heavy_operations_match_ext4() {
    run(&META_HEAVY, env_u64("FUSEVOL_DIFF_SEED", DEFAULT_SEED));
}

#[test]
fn random_data_heavy_operations_match_ext4() {
    run(
        &DATA_HEAVY,
        env_u64("FUSEVOL_DIFF_SEED", DEFAULT_SEED).wrapping_add(1),
    );
}
