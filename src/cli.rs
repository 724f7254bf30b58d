//! Command-line interface: the clap definitions and what each subcommand does with the
//! library. `main` only parses, calls [`run`], and turns errors into one line and an
//! exit code.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::control::{self, Request, Response};
use crate::fsck;
use crate::mount::{self, MountRequest, ServeOptions};
use crate::size::{format_bytes, ByteSize};
use crate::store::{self, Store, StoreOptions, VolumeInfo};

/// Exit status: the command did what it was asked.
pub const EXIT_OK: i32 = 0;
/// Exit status: `fsck` found problems (and, with `--repair`, fixed them).
pub const EXIT_PROBLEMS: i32 = 1;
/// Exit status: the command could not run (bad arguments, or an error).
pub const EXIT_FAILED: i32 = 2;

const EXIT_HELP: &str =
    "Exit status: 0 done; 1 fsck found problems, or scrub repaired a copy or misses one; 2 could not run (bad \
arguments or an error). Errors are one `error: ...` line on stderr; with --json, a JSON \
object {\"error\": KIND, \"message\": TEXT} instead, KIND a stable name such as \
volume_not_found, volume_exists, volume_busy, store_busy, store_not_found, \
invalid_argument, below_usage, no_space, corrupt, usage.";

/// A command's error with its stable kind (what `--json` reports as `error`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: String,
    pub message: String,
}

fn failure(kind: &str, message: impl Into<String>) -> anyhow::Error {
    Failure {
        kind: kind.into(),
        message: message.into(),
    }
    .into()
}

/// The stable kind of a command's error: the first cause that has one (a [`Failure`], a
/// store error), `io` for an I/O error, else `error`.
pub fn error_kind(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.kind.clone();
        }
        if let Some(s) = cause.downcast_ref::<store::Error>() {
            return s.kind().into();
        }
        if cause.downcast_ref::<control::ControlError>().is_some() {
            return "store_unreachable".into();
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "io".into();
        }
    }
    "error".into()
}

/// fusevol: fast, quota-enforced, node-local volumes (FUSE over a RocksDB chunk store).
#[derive(Debug, Parser)]
#[command(name = "fusevol", version, about, after_help = EXIT_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a volume of a store (created if missing) and serve it in the foreground.
    Mount(MountArgs),
    /// Manage the volumes of a store (works while volumes are mounted).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Check a store offline; exit 0 when clean, 1 when problems were found (and, with
    /// --repair, fixed).
    Fsck(FsckArgs),
    /// Compare the copies of a replicated volume key by key and rewrite in each copy what
    /// differs from, or cannot be read where, another copy reads it; exit 0 when the copies
    /// were equal, 1 when something was repaired or a copy is missing. Through the mount's control socket while
    /// the volume is served (writes go on), else offline (copies behind the newest are
    /// rewritten first, as at mount).
    Scrub(ScrubArgs),
    /// Run the node agent (Kubernetes DaemonSet): serve the node's PersistentVolumes and
    /// publish its capacity. Talks to the API server of KUBECONFIG or the in-cluster config.
    Agent(AgentArgs),
    /// Run the provisioning controller (Kubernetes Deployment, leader-elected).
    Controller(ControllerArgs),
    /// Hold the FUSE connections of the servers that use SOCKET (`mount --fdstore`,
    /// `agent --fdstore`), so that their mounts outlive a crash, a restart or an upgrade
    /// of the server: the next server takes them over. Runs until killed; killing it
    /// ends no mount while their servers live.
    Fdstore(FdstoreArgs),
    /// Print a shell completion script for SHELL on stdout, e.g.
    /// `fusevol completions bash > /etc/bash_completion.d/fusevol`.
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct FdstoreArgs {
    /// The unix socket to listen on (created; a stale one is replaced).
    #[arg(long, value_name = "SOCKET")]
    pub socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's TOML configuration (see deploy/agent-config.yaml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The FUSE connection holder (`fusevol fdstore --socket`): volumes stay mounted
    /// when the agent exits (crash, restart, upgrade) and the next agent serves them on.
    #[arg(long, value_name = "SOCKET")]
    pub fdstore: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Namespace of the leader-election Lease and the CSIStorageCapacity objects (default:
    /// the POD_NAMESPACE environment variable, else fusevol-system).
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "fusevol-controller", value_name = "NAME")]
    pub leader_election_lease: String,
    /// This replica's identity in the Lease (default: the POD_NAME environment variable, else
    /// the host name and process id).
    #[arg(long, value_name = "ID")]
    pub identity: Option<String>,
    /// Lease duration in seconds: how long a dead leader blocks a new one.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub lease_duration: u64,
    /// Address of /healthz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9809", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Seconds a Node object must stay deleted before the controller cleans up after it (its
    /// FusevolNode, the finalizers of its deleted PVs, opted-in claims). A kubelet that
    /// re-registers the node within it cancels the cleanup. NotReady nodes are never cleaned up.
    #[arg(long, default_value_t = crate::controller::nodes::DEFAULT_GRACE.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub node_loss_grace: u64,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Store directory (created if missing or empty). Given again, once per disk, for a
    /// replicated volume (--replicas): a copy in each, the first naming the set. A
    /// directory without its copy (a replacement disk) is given one from the newest copy.
    #[arg(long, value_name = "DIR", required = true)]
    pub data: Vec<PathBuf>,
    /// Copies a new volume keeps, one in each --data directory (each on its own disk):
    /// every write and fsync is in all healthy copies before it is acknowledged; a value
    /// one copy cannot read is read from another and repaired. Fixed at creation.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8))]
    pub replicas: Option<u32>,
    /// Volume to mount (created if missing).
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub volume: String,
    /// Quota for file data, as a Kubernetes quantity (64Mi, 10Gi, 500M). Sets the quota
    /// of an existing volume too. Default for a new volume: none.
    #[arg(long, value_name = "SIZE")]
    pub quota: Option<ByteSize>,
    /// Maximum number of inodes (files, directories, links...).
    #[arg(long, value_name = "N")]
    pub inodes: Option<u64>,
    /// Compression of a new volume's data on disk: none (the default), lz4 or zstd. The
    /// quota counts the bytes before compression. Fixed at creation: for an existing
    /// volume of another compression, a warning.
    #[arg(long, value_name = "none|lz4|zstd")]
    pub compression: Option<store::Compression>,
    /// Encryption at rest of a new volume: none (the default) or aes-256-gcm (contents,
    /// file names, symlink targets and xattrs sealed with a per-volume key; needs
    /// --key-file). Fixed at creation: asking an existing volume for another is refused.
    #[arg(long, value_name = "none|aes-256-gcm")]
    pub encryption: Option<store::Encryption>,
    /// The volume's master key: a file of 32 bytes or 64 hex digits (`openssl rand -hex
    /// 32 > FILE`). Needed to create and to mount an encrypted volume.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Let users other than the mounting user access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// With more than one thread: the threads take turns at reading requests; the reader
    /// answers metadata requests itself and passes the reading on only while it answers a
    /// data request (read, write, fsync, fallocate, lseek, copy_file_range, truncation)
    /// (true: metadata stays on one hot thread); or every thread reads at once (false).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub split_data: bool,
    /// Chunk size of a new store (power of two, 4Ki..4Mi); ignored for an existing store.
    #[arg(long, value_name = "SIZE", hide = true)]
    pub chunk_size: Option<ByteSize>,
    /// Free space to keep on the store's disk: below it, writes fail with ENOSPC before
    /// the database itself runs out of room (deletes always work). Default: 5% of the
    /// disk, at least 8Mi and at most 256Mi; 0 turns it off.
    #[arg(long, value_name = "SIZE")]
    pub free_space_floor: Option<ByteSize>,
    /// Memory for the store's caches and write buffers together (at least 16Mi): what the
    /// process holds beyond a few MiB of its own. For a replicated volume, each of its
    /// stores has this much.
    #[arg(long, value_name = "SIZE", default_value = "64Mi")]
    pub memory_budget: ByteSize,
    /// The FUSE connection holder (`fusevol fdstore --socket`): the mount outlives this
    /// process. SIGTERM, or another `fusevol mount` of the same mount point, leaves it to
    /// the next server; a crash too. Ctrl-C (SIGINT) unmounts.
    #[arg(long, value_name = "SOCKET")]
    pub fdstore: Option<PathBuf>,
    /// The most of the page cache the mount's dirty pages may take before its writers
    /// wait for writeback: a size (256Mi) or a percentage of the node's dirty threshold
    /// (20%); 0 leaves the kernel's bound for FUSE mounts (1% of that threshold). Set in
    /// the mount's /sys/class/bdi/0:<minor> (a warning if /sys is read-only).
    #[arg(long, value_name = "SIZE|PERCENT", default_value_t = crate::bdi::DEFAULT)]
    pub max_dirty: crate::bdi::DirtyLimit,
    /// Turn the kernel's `fuse.wake_here` on for the node, if it has it: a task waiting
    /// for a FUSE reply wakes on the replying CPU (creates ~1.3x as fast here). Node-wide
    /// and left on at exit; false leaves the kernel's setting alone.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub fuse_wake_here: bool,
    /// Serve through FUSE over io_uring (Linux 6.14+): one ring per CPU, a request and
    /// its reply in one system call instead of a read and a write of /dev/fuse. Turns the
    /// kernel's node-wide `fuse.enable_uring` on (it only offers the choice to FUSE
    /// servers); falls back to /dev/fuse where the kernel lacks it. Not with --fdstore (a
    /// request a ring of a dead server had taken is never given again).
    #[arg(long, value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub io_uring: bool,
    /// Where to mount (an existing directory).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct DataArg {
    /// Store directory.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
}

/// A limit that can be removed with `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    None,
    Bytes(u64),
}

fn parse_size_limit(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit::None);
    }
    s.parse::<ByteSize>()
        .map(|b| Limit::Bytes(b.0))
        .map_err(|e| e.to_string())
}

fn parse_count_limit(s: &str) -> Result<Limit, String> {
    if s == "none" {
        return Ok(Limit::None);
    }
    s.parse::<u64>()
        .map(Limit::Bytes)
        .map_err(|_| format!("invalid inode limit {s:?}: use a whole number or none"))
}

impl Limit {
    fn option(self) -> Option<u64> {
        match self {
            Limit::None => None,
            Limit::Bytes(b) => Some(b),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        #[command(flatten)]
        data: DataArg,
        name: String,
        #[arg(long, value_name = "SIZE")]
        quota: Option<ByteSize>,
        #[arg(long, value_name = "N")]
        inodes: Option<u64>,
        /// Compression of the volume's data on disk (fixed at creation). The quota counts
        /// the bytes before compression.
        #[arg(long, value_name = "none|lz4|zstd", default_value_t = store::Compression::None)]
        compression: store::Compression,
        /// Encryption at rest (fixed at creation): aes-256-gcm needs --key-file.
        #[arg(long, value_name = "none|aes-256-gcm", default_value_t = store::Encryption::None)]
        encryption: store::Encryption,
        /// The master key of an encrypted volume: a file of 32 bytes or 64 hex digits.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List volumes with their quota and usage.
    List {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Inspect {
        #[command(flatten)]
        data: DataArg,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a volume's quota or inode limit (online; `none` removes a limit).
    Resize {
        #[command(flatten)]
        data: DataArg,
        name: String,
        #[arg(long, value_name = "SIZE|none", value_parser = parse_size_limit)]
        quota: Option<Limit>,
        #[arg(long, value_name = "N|none", value_parser = parse_count_limit)]
        inodes: Option<Limit>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and its data (refused while mounted).
    Delete {
        #[command(flatten)]
        data: DataArg,
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Store directory.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Check only this volume.
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Fix what is found.
    #[arg(long)]
    pub repair: bool,
    /// The master key of the encrypted volumes to check (an encrypted volume cannot be
    /// checked without its key).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScrubArgs {
    /// The store directory of each copy (`--data` as given to `fusevol mount`).
    #[arg(long, value_name = "DIR", required = true)]
    pub data: Vec<PathBuf>,
    /// The replicated volume.
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    /// The master key of an encrypted volume (offline only: a mount has it already).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// Did the command ask for JSON output (then errors are JSON too)?
    pub fn json(&self) -> bool {
        match &self.command {
            Command::Fsck(a) => a.json,
            Command::Scrub(a) => a.json,
            Command::Volume(
                VolumeCommand::Create { json, .. }
                | VolumeCommand::List { json, .. }
                | VolumeCommand::Inspect { json, .. }
                | VolumeCommand::Resize { json, .. },
            ) => *json,
            _ => false,
        }
    }
}

/// Runs a parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Mount(a) => {
            if a.memory_budget.0 < store::MIN_MEMORY_BUDGET {
                return Err(failure(
                    "invalid_argument",
                    format!(
                        "--memory-budget {}: must be at least 16Mi",
                        format_bytes(a.memory_budget.0)
                    ),
                ));
            }
            let mut data = a.data.into_iter();
            let req = MountRequest {
                data: data.next().unwrap_or_default(),
                mirrors: data.collect(),
                replicas: a.replicas,
                volume: a.volume,
                quota: a.quota.map(|q| q.0),
                inodes: a.inodes,
                compression: a.compression,
                encryption: a.encryption,
                key: read_key(a.key_file.as_deref())?,
                mountpoint: a.mountpoint,
                chunk_size: a.chunk_size.map(|c| c.0),
                free_space_floor: a.free_space_floor.map(|c| c.0),
                memory_budget: a.memory_budget.0,
                fuse_wake_here: a.fuse_wake_here,
                serve: ServeOptions {
                    allow_other: a.allow_other,
                    threads: usize::from(a.threads),
                    split_data: a.split_data,
                    io_uring: a.io_uring,
                    fdstore: a.fdstore.map(crate::fdstore::FdStore::new),
                    max_dirty: a.max_dirty,
                    ..ServeOptions::default()
                },
            };
            store::validate_volume_name(&req.volume)?;
            mount::run(&req)?;
            Ok(0)
        }
        Command::Volume(v) => volume(v),
        Command::Completions(a) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "fusevol", &mut std::io::stdout());
            Ok(0)
        }
        Command::Fdstore(a) => {
            crate::fdstore::run(&a.socket)?;
            Ok(0)
        }
        Command::Fsck(a) => fsck_cmd(a),
        Command::Scrub(a) => scrub_cmd(a),
        Command::Agent(a) => {
            let (config, text) = crate::agent::config::AgentConfig::load_text(
                &a.config,
                std::env::var("NODE_NAME").ok(),
            )?;
            let fdstore = a.fdstore.map(crate::fdstore::FdStore::new);
            let source = Some((a.config, text));
            runtime()?.block_on(crate::agent::run(config, source, fdstore))?;
            Ok(0)
        }
        Command::Controller(a) => {
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let settings = crate::controller::Settings {
                namespace: a
                    .namespace
                    .or_else(|| env("POD_NAMESPACE"))
                    .unwrap_or_else(|| "fusevol-system".into()),
                lease: a.leader_election_lease,
                identity: a.identity.or_else(|| env("POD_NAME")).unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_string())
                        .unwrap_or_else(|_| "fusevol".into());
                    format!("{host}-{}", std::process::id())
                }),
                listen: a.listen,
                lease_duration: std::time::Duration::from_secs(a.lease_duration),
                node_loss_grace: std::time::Duration::from_secs(a.node_loss_grace),
            };
            runtime()?.block_on(crate::controller::run(settings))?;
            Ok(0)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs a volume request on the store: directly when this process can open it, through
/// the owner's control socket when another process serves it.
fn call(dir: &Path, req: Request) -> anyhow::Result<Response> {
    if !dir.exists() {
        return Err(failure(
            "store_not_found",
            format!("store {} does not exist", dir.display()),
        ));
    }
    let resp = match Store::open_existing(dir, &StoreOptions::default()) {
        Ok(store) => control::dispatch(&store, None, req),
        Err(store::Error::Locked(_)) => control::call(dir, &req)?,
        Err(e) => return Err(e.into()),
    };
    match resp {
        Response::Error(e) => Err(failure("error", e)),
        Response::Failed { kind, message } => Err(failure(&kind, message)),
        resp => Ok(resp),
    }
}

fn human(v: &VolumeInfo) -> String {
    let quota = v
        .quota_bytes
        .map(format_bytes)
        .unwrap_or_else(|| "none".into());
    let inodes = v
        .inode_limit
        .map(|l| l.to_string())
        .unwrap_or_else(|| "none".into());
    let c = &v.compression;
    let compression = match (c.algorithm, c.logical_bytes, c.stored_bytes) {
        (store::Compression::None, _, _) => String::new(),
        (algorithm, Some(logical), Some(stored)) => {
            format!(" compression={algorithm} data={logical} stored={stored}")
        }
        (algorithm, _, _) => format!(" compression={algorithm}"),
    };
    let encryption = match v.encryption.algorithm {
        store::Encryption::None => String::new(),
        algorithm => format!(" encryption={algorithm}"),
    };
    let replicas = match &v.replicas {
        None => String::new(),
        Some(r) if r.copies.is_empty() => format!(" replicas={}", r.wanted),
        Some(r) => {
            let healthy = r
                .copies
                .iter()
                .filter(|c| c.state == store::CopyState::Healthy)
                .count();
            format!(
                " replicas={}/{}{} failovers={} repairs={}",
                healthy,
                r.wanted,
                if r.degraded { " DEGRADED" } else { "" },
                r.failovers,
                r.repairs
            )
        }
    };
    format!(
        "{:<24} quota={:<8} used={:<12} inodes={}/{} chunks={}{}{}{}{}",
        v.name,
        quota,
        v.used_bytes,
        v.inodes,
        inodes,
        v.chunks,
        compression,
        encryption,
        replicas,
        if v.mounted { " (mounted)" } else { "" }
    )
}

fn print_volume(v: &VolumeInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", human(v));
    }
    Ok(())
}

fn volume(cmd: VolumeCommand) -> anyhow::Result<i32> {
    match cmd {
        VolumeCommand::Create {
            data,
            name,
            quota,
            inodes,
            compression,
            encryption,
            key_file,
            json,
        } => {
            store::validate_volume_name(&name)?;
            let key = read_key(key_file.as_deref())?;
            if encryption.is_none() != key.is_none() {
                return Err(failure(
                    "invalid_argument",
                    "--encryption aes-256-gcm and --key-file go together".to_string(),
                ));
            }
            if !data.data.exists() || !Store::exists(&data.data) {
                // Creating a volume may create the store (as `mount` does).
                let s = Store::open_or_create(&data.data, &StoreOptions::default())?;
                drop(s);
            }
            let req = Request::Create {
                name,
                quota: quota.map(|q| q.0),
                inodes,
                compression,
                encryption,
                key: key.as_ref().map(control::SecretHex::of),
            };
            if let Response::Volume(v) = call(&data.data, req)? {
                if v.encryption.algorithm != encryption {
                    return Err(failure(
                        "unsupported",
                        format!(
                            "the process serving the store does not support encryption: it created volume {} unencrypted; it remains (delete it with `fusevol volume delete`)",
                            v.name
                        ),
                    ));
                }
                if v.compression.algorithm != compression {
                    // A serving process older than compression ignores the option.
                    return Err(failure(
                        "unsupported",
                        format!(
                            "the process serving the store does not support compression {compression}: it created volume {} with compression {}; it remains (delete it with `fusevol volume delete`)",
                            v.name, v.compression.algorithm
                        ),
                    ));
                }
                print_volume(&v, json)?;
            }
        }
        VolumeCommand::List { data, json } => {
            if let Response::Volumes(vs) = call(&data.data, Request::List)? {
                if json {
                    println!("{}", serde_json::to_string(&vs)?);
                } else {
                    for v in &vs {
                        println!("{}", human(v));
                    }
                }
            }
        }
        VolumeCommand::Inspect { data, name, json } => {
            if let Response::Volume(v) = call(&data.data, Request::Inspect { name })? {
                print_volume(&v, json)?;
            }
        }
        VolumeCommand::Resize {
            data,
            name,
            quota,
            inodes,
            json,
        } => {
            if quota.is_none() && inodes.is_none() {
                return Err(failure(
                    "invalid_argument",
                    "nothing to change: give --quota and/or --inodes",
                ));
            }
            let req = Request::Resize {
                name,
                quota: quota.map(Limit::option),
                inodes: inodes.map(Limit::option),
            };
            if let Response::Volume(v) = call(&data.data, req)? {
                print_volume(&v, json)?;
            }
        }
        VolumeCommand::Delete { data, name } => {
            refuse_if_held(&data.data, Some(&name), "delete it")?;
            call(&data.data, Request::Delete { name: name.clone() })?;
            println!("deleted volume {name}");
        }
    }
    Ok(0)
}

/// Refuses when the fd holder the store's servers use still keeps a FUSE connection of
/// `volume` (any volume if `None`): its mount is live (pods may use it through their bind
/// mounts) and only waits for the next server, which must find the volume as the kernel
/// last saw it. No holder running means nothing is held.
fn refuse_if_held(dir: &Path, volume: Option<&str>, what: &str) -> anyhow::Result<()> {
    let Some(socket) = Store::recorded_holder(dir) else {
        return Ok(());
    };
    let holder = crate::fdstore::FdStore::new(&socket);
    let held = match holder.held_for_store(dir) {
        Ok(held) => held,
        Err(crate::fdstore::FdStoreError::Socket { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(failure(
            "holder_unreachable",
            format!("cannot ask the fd holder at {} whether a volume of this store is still mounted ({e}); refusing to {what}",
            socket.display()
        ))),
    };
    if let Some((mnt, h)) = held
        .iter()
        .find(|(_, h)| volume.is_none_or(|v| v == h.volume))
    {
        return Err(failure(
            "volume_busy",
            format!("volume {} is still mounted at {mnt} (its FUSE connection is kept by the fd holder at {}): unmount it first (umount {mnt}), then {what}",
            h.volume,
            socket.display()
        )));
    }
    Ok(())
}

/// The master key in `path`, if given; a clear error if it cannot be read or is not a key.
fn read_key(path: Option<&Path>) -> anyhow::Result<Option<store::MasterKey>> {
    match path {
        None => Ok(None),
        Some(p) => store::MasterKey::read_file(p)
            .map(Some)
            .map_err(|e| failure("bad_key", format!("--key-file {}: {e}", p.display()))),
    }
}

fn scrub_cmd(a: ScrubArgs) -> anyhow::Result<i32> {
    let first = &a.data[0];
    if !first.exists() {
        return Err(failure(
            "store_not_found",
            format!("store {} does not exist", first.display()),
        ));
    }
    let report = match Store::open_existing(first, &StoreOptions::default()) {
        Err(store::Error::Locked(_)) => {
            let req = Request::Scrub {
                name: a.volume.clone(),
            };
            match control::call(first, &req)? {
                Response::Scrub(r) => r,
                Response::Failed { kind, message } => return Err(failure(&kind, message)),
                other => return Err(failure("error", format!("unexpected answer {other:?}"))),
            }
        }
        Err(e) => return Err(e.into()),
        Ok(store) => scrub_offline(store, &a)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{}: compared {} keys ({} bytes) in {} copies: {} values repaired, {} stretches unreadable in a copy{}",
            report.volume,
            report.keys,
            report.bytes,
            report.copies,
            report.repaired,
            report.unreadable,
            if report.degraded {
                "; DEGRADED: a copy is missing or failed and was not compared"
            } else {
                ""
            }
        );
    }
    Ok(
        if report.repaired > 0 || report.unreadable > 0 || report.degraded {
            1
        } else {
            0
        },
    )
}

/// `fusevol scrub` of a volume no process serves: its stores opened here (one that cannot
/// be is left out, as at mount), the copies assembled, then compared.
fn scrub_offline(first: Store, a: &ScrubArgs) -> anyhow::Result<store::ScrubReport> {
    let mut stores = vec![first];
    for dir in &a.data[1..] {
        match Store::open_existing(dir, &StoreOptions::default()) {
            Ok(s) => stores.push(s),
            Err(e) => eprintln!("fusevol: leaving out {}: {e}", dir.display()),
        }
    }
    if let Some(key) = read_key(a.key_file.as_deref())? {
        for s in &stores {
            if s.inspect_volume(&a.volume).is_ok() {
                s.unlock(&a.volume, &key)?;
            }
        }
    }
    let vol = store::open_replicated(&stores, &a.volume)?;
    let mut last = std::time::Instant::now();
    let mut progress = |r: &store::ScrubReport| {
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            last = std::time::Instant::now();
            eprintln!(
                "fusevol: scrub: {} keys ({}) compared, {} repaired",
                r.keys,
                format_bytes(r.bytes),
                r.repaired
            );
        }
    };
    Ok(vol.scrub(&mut progress)?)
}

fn fsck_cmd(a: FsckArgs) -> anyhow::Result<i32> {
    if !a.data.exists() {
        return Err(failure(
            "store_not_found",
            format!("store {} does not exist", a.data.display()),
        ));
    }
    if a.repair {
        refuse_if_held(&a.data, a.volume.as_deref(), "repair it")?;
    }
    let store = Store::open_existing(&a.data, &StoreOptions::default()).map_err(|e| match e {
        store::Error::Locked(p) => failure(
            "store_busy",
            format!(
                "store {} is in use by a running fusevol; stop it first (fsck works offline)",
                p.display()
            ),
        ),
        e => e.into(),
    })?;
    let names = match &a.volume {
        Some(n) => vec![n.clone()],
        None => store.volume_names()?,
    };
    let key = read_key(a.key_file.as_deref())?;
    let mut reports = Vec::new();
    for n in &names {
        if !store.inspect_volume(n)?.encryption.algorithm.is_none() {
            let unlocked = match &key {
                Some(key) => store.unlock(n, key),
                None => Err(store::Error::KeyRequired(n.clone())),
            };
            match unlocked {
                Ok(()) => {}
                // Named: it cannot be checked, which is an error.
                Err(e) if a.volume.is_some() => return Err(e.into()),
                // The whole store: the others are checked, this one is named as skipped.
                Err(e) => {
                    reports.push(fsck::VolumeReport {
                        volume: n.clone(),
                        pending: vec![format!("not checked: {e}")],
                        ..Default::default()
                    });
                    continue;
                }
            }
        }
        let r = fsck::check_volume(&store, n, a.repair)
            .with_context(|| format!("checking volume {n}"))?;
        reports.push(r);
    }
    let problems: usize = reports.iter().map(|r| r.problems.len()).sum();
    if a.json {
        println!("{}", serde_json::to_string(&reports)?);
    } else {
        for r in &reports {
            for p in &r.problems {
                println!("{}: {p}", r.volume);
            }
            for p in &r.pending {
                println!("{}: note: {p}", r.volume);
            }
            println!(
                "{}: {} inodes, {} problem(s){}",
                r.volume,
                r.inodes,
                r.problems.len(),
                if r.repaired { ", repaired" } else { "" }
            );
        }
    }
    Ok(if problems == 0 {
        EXIT_OK
    } else {
        EXIT_PROBLEMS
    })
}
