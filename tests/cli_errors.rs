//! Bad input: a one-line `error:` message, a non-zero exit, never a panic, and the store left
//! as it was.

#[macro_use]
mod common;

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Run a `fusevol mount` that must be refused. A mount that succeeds instead keeps running:
/// it is killed after a while and the test fails.
fn refused_mount(args: Vec<OsString>) -> Out {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    fusevol_timeout(args, Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "`fusevol {}` kept running instead of failing",
                shown.join(" ")
            )
        })
        .user_error()
}

fn mount_args(data: &Path, mnt: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a = args!["mount", "--data", data, "--volume", "vol"];
    a.extend(extra.iter().map(OsString::from));
    a.push(mnt.into());
    a
}

/// A store with one volume "vol" holding a file, not mounted.
fn populated_store() -> Dirs {
    let m = Mount::start(Opts::new().quota("64Mi"));
    fs::write(m.path("file"), b"precious").unwrap();
    m.stop()
}

fn assert_store_intact(dirs: Dirs) {
    let v = inspect(&dirs.data, "vol");
    assert_eq!(v.quota_bytes, Some(64 * MIB));
    let m = Mount::start_in(dirs, Opts::new());
    assert_eq!(fs::read(m.path("file")).unwrap(), b"precious");
}

#[test]
fn mount_refuses_a_data_dir_with_foreign_files_and_leaves_it_untouched() {
    let dirs = Dirs::new();
    fs::write(dirs.data.join("notes.txt"), b"not a fusevol store").unwrap();
    fs::create_dir_all(dirs.data.join("photos/2024")).unwrap();
    fs::write(dirs.data.join("photos/2024/a.jpg"), pattern(1, 5000)).unwrap();
    let before = snapshot_tree(&dirs.data);
    refused_mount(mount_args(&dirs.data, &dirs.mnt, &[]));
    assert_eq!(
        snapshot_tree(&dirs.data),
        before,
        "the foreign data dir was modified"
    );
    assert!(!is_mounted(&dirs.mnt));
    // Volume commands refuse it as well.
    fusevol(args!["volume", "create", "--data", &dirs.data, "v"]).user_error();
    fusevol(args!["volume", "list", "--data", &dirs.data]).user_error();
    assert_eq!(
        snapshot_tree(&dirs.data),
        before,
        "the foreign data dir was modified"
    );
}

#[test]
fn mount_refuses_a_data_path_that_is_a_regular_file() {
    let dirs = Dirs::new();
    let file = dirs.root.join("plainfile");
    fs::write(&file, b"x").unwrap();
    refused_mount(mount_args(&file, &dirs.mnt, &[]));
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn mount_to_a_missing_mountpoint_fails_and_keeps_the_store() {
    let dirs = populated_store();
    let missing = dirs.root.join("no-such-dir");
    refused_mount(mount_args(&dirs.data, &missing, &[]));
    assert!(!missing.exists(), "the missing mountpoint was created");
    assert_store_intact(dirs);
}

#[test]
fn mount_to_a_missing_mountpoint_does_not_create_a_store() {
    let dirs = Dirs::new();
    refused_mount(mount_args(&dirs.data, &dirs.root.join("no-such-dir"), &[]));
    let left: Vec<_> = fs::read_dir(&dirs.data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "a failed mount left files in the empty data dir: {left:?}"
    );
}

#[test]
fn mount_to_a_regular_file_fails() {
    let dirs = populated_store();
    let file = dirs.root.join("file-as-mountpoint");
    fs::write(&file, b"x").unwrap();
    refused_mount(mount_args(&dirs.data, &file, &[]));
    assert_eq!(fs::read(&file).unwrap(), b"x");
    assert_store_intact(dirs);
}

#[test]
fn second_mount_of_the_same_store_is_refused_while_the_first_runs() {
    let m = Mount::start(Opts::new().quota("64Mi"));
    fs::write(m.path("f"), b"first").unwrap();
    let other = m.dirs().extra_dir("mnt2");
    // Same volume, and another volume of the same store.
    refused_mount(mount_args(m.data(), &other, &[]));
    let mut a = args!["mount", "--data", m.data(), "--volume", "other"];
    a.push(other.clone().into());
    refused_mount(a);
    assert!(!is_mounted(&other));
    assert_eq!(
        fs::read(m.path("f")).unwrap(),
        b"first",
        "the first mount was disturbed"
    );
    fs::write(m.path("g"), b"still writable").unwrap();
    assert_eq!(m.inspect().quota_bytes, Some(64 * MIB));
    let dirs = m.stop();
    let names: Vec<_> = list(&dirs.data).into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["vol"], "the refused mount created a volume");
}

#[test]
fn invalid_sizes_are_rejected_everywhere_without_side_effects() {
    let dirs = populated_store();
    for bad in ["12Qx", "-1Gi", "Mi", "1..5Gi", "ten", ""] {
        refused_mount(mount_args(&dirs.data, &dirs.mnt, &["--quota", bad]));
        fusevol(args![
            "volume", "create", "--data", &dirs.data, "new", "--quota", bad
        ])
        .user_error();
        fusevol(args![
            "volume", "resize", "--data", &dirs.data, "vol", "--quota", bad
        ])
        .user_error();
    }
    fusevol(args![
        "volume", "create", "--data", &dirs.data, "new", "--inodes", "many"
    ])
    .user_error();
    for small in ["1Mi", "0", "15Mi"] {
        refused_mount(mount_args(
            &dirs.data,
            &dirs.mnt,
            &["--memory-budget", small],
        ));
    }
    let names: Vec<_> = list(&dirs.data).into_iter().map(|v| v.name).collect();
    assert_eq!(
        names,
        vec!["vol"],
        "a volume was created despite an invalid size"
    );
    assert_store_intact(dirs);
}

#[test]
fn volume_commands_on_unknown_or_duplicate_names_fail() {
    let dirs = populated_store();
    fusevol(args!["volume", "inspect", "--data", &dirs.data, "nope"]).user_error();
    fusevol(args![
        "volume", "resize", "--data", &dirs.data, "nope", "--quota", "1Gi"
    ])
    .user_error();
    fusevol(args!["volume", "delete", "--data", &dirs.data, "nope"]).user_error();
    fusevol(args![
        "volume", "create", "--data", &dirs.data, "vol", "--quota", "1Gi"
    ])
    .user_error();
    assert_store_intact(dirs);
}

#[test]
fn unknown_subcommands_and_missing_arguments_are_usage_errors() {
    let dirs = Dirs::new();
    fusevol(args!["frobnicate"]).user_error();
    fusevol(args!["volume", "create", "--data", &dirs.data]).user_error();
    fusevol(args!["mount", "--data", &dirs.data]).user_error();
    fusevol(args!["volume", "inspect", "nodata"]).user_error();
}

/// Overwrite `p` with junk and return the junk.
fn clobber(p: &Path, seed: u64) -> Vec<u8> {
    let junk = pattern(seed, 300);
    fs::write(p, &junk).unwrap();
    junk
}

/// Every command on a corrupted store fails cleanly and leaves the files as they are.
fn assert_corruption_reported(dirs: &Dirs) {
    let before = snapshot_tree(&dirs.data);
    refused_mount(mount_args(&dirs.data, &dirs.mnt, &[]));
    assert!(!is_mounted(&dirs.mnt));
    fusevol(args!["volume", "list", "--data", &dirs.data]).user_error();
    for cmd in [
        args!["volume", "list", "--data", &dirs.data, "--json"],
        args!["volume", "inspect", "--data", &dirs.data, "vol", "--json"],
    ] {
        let (kind, _, out) = fusevol(cmd).json_error_of_any_kind();
        assert!(
            ["corrupt", "database", "not_a_store", "io"].contains(&kind.as_str()),
            "kind {kind:?} for a damaged store: {out:?}"
        );
    }
    fusevol(args!["volume", "create", "--data", &dirs.data, "fresh"]).user_error();
    let out = fsck(&dirs.data, &[]);
    assert!(
        !out.success(),
        "fsck of a corrupted store exited 0: {out:?}"
    );
    out.no_panic();
    let after = snapshot_tree(&dirs.data);
    // RocksDB may add log files when it tries to open; nothing may be rewritten or removed.
    for (path, content) in &before {
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("LOG") {
            continue;
        }
        assert_eq!(
            after.get(path),
            Some(content),
            "{} was changed or removed",
            path.display()
        );
    }
}

fn db_files(dirs: &Dirs, prefix: &str) -> Vec<std::path::PathBuf> {
    let db = dirs.data.join("db");
    assert!(
        db.is_dir(),
        "expected the RocksDB files in {}",
        db.display()
    );
    let v: Vec<_> = fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    assert!(!v.is_empty(), "no {prefix}* file in {}", db.display());
    v
}

#[test]
fn garbage_in_the_db_current_file_is_reported_not_reinitialized() {
    let dirs = populated_store();
    for p in db_files(&dirs, "CURRENT") {
        clobber(&p, 1);
    }
    assert_corruption_reported(&dirs);
}

#[test]
fn garbage_in_the_db_manifest_is_reported_not_reinitialized() {
    let dirs = populated_store();
    for (i, p) in db_files(&dirs, "MANIFEST").into_iter().enumerate() {
        clobber(&p, 10 + i as u64);
    }
    assert_corruption_reported(&dirs);
}

#[test]
fn junk_in_the_fusevol_marker_file_is_reported() {
    let dirs = populated_store();
    let marker = dirs.data.join("FUSEVOL");
    assert!(
        marker.is_file(),
        "expected the marker file {}",
        marker.display()
    );
    clobber(&marker, 3);
    assert_corruption_reported(&dirs);
}

#[test]
fn missing_db_directory_in_a_marked_store_is_reported() {
    let dirs = populated_store();
    let db = dirs.data.join("db");
    assert!(db.is_dir());
    fs::rename(&db, dirs.root.join("db-moved-away")).unwrap();
    assert_corruption_reported(&dirs);
    assert!(
        !db.join("CURRENT").exists(),
        "a new empty database was created in place of the missing one"
    );
}

/// `fusevol completions SHELL` prints a completion script that names every subcommand
/// (bash's is checked by bash itself, and completes `fusevol vo` to `volume`); an unknown
/// shell is a one-line error with exit 2.
#[test]
fn completions_cover_every_subcommand_and_bash_loads_them() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = fusevol(["completions", shell]);
        assert!(out.success(), "{shell}: {}", out.stderr);
        for sub in ["mount", "volume", "fsck", "agent", "controller", "fdstore"] {
            assert!(out.stdout.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let script = fusevol(["completions", "bash"]).stdout;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fusevol.bash");
    fs::write(&path, script).unwrap();
    // Load the script, complete `fusevol vo<TAB>` as bash would, print the candidates.
    let probe = format!(
        "source {}; COMP_WORDS=(fusevol vo); COMP_CWORD=1; COMP_LINE='fusevol vo'; COMP_POINT=10; _fusevol fusevol vo fusevol; echo \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let bash = std::process::Command::new("bash")
        .args(["-c", &probe])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&bash.stdout);
    assert!(
        bash.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&bash.stderr)
    );
    assert_eq!(
        said.trim(),
        "volume",
        "bash completed `fusevol vo` to {said:?}"
    );
    let out = fusevol(["completions", "tcsh"]);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// Scripts get a stable error kind with `--json`: one JSON object on stderr, exit 2, nothing
/// on stdout; and exit 2 (could not run) is distinct from fsck's 1 (problems found).
#[test]
fn json_errors_carry_a_stable_kind_and_exit_2() {
    let dirs = populated_store();
    let d = &dirs.data;
    let msg = fusevol(args!["volume", "inspect", "--data", d, "nope", "--json"])
        .json_error("volume_not_found");
    assert!(msg.contains("nope"), "{msg}");
    fusevol(args!["volume", "create", "--data", d, "vol", "--json"]).json_error("volume_exists");
    fusevol(args!["volume", "create", "--data", d, "Bad/Name", "--json"])
        .json_error("invalid_argument");
    fusevol(args!["volume", "resize", "--data", d, "vol", "--json"]).json_error("invalid_argument");
    fusevol(args![
        "volume", "resize", "--data", d, "vol", "--inodes", "1", "--json"
    ])
    .json_error("below_usage");
    let missing = dirs.extra_dir("missing").join("store");
    fusevol(args!["volume", "list", "--data", &missing, "--json"]).json_error("store_not_found");
    fusevol(args!["fsck", "--data", &missing, "--json"]).json_error("store_not_found");
    // A usage error with --json is JSON too.
    fusevol(args!["volume", "list", "--json", "--frobnicate"]).json_error("usage");
    // While the store is served, fsck cannot run: 2, not fsck's 1.
    let m = Mount::start_in(dirs, Opts::new());
    fusevol(args!["fsck", "--data", m.data(), "--json"]).json_error("store_busy");
    fusevol(args!["fsck", "--data", m.data()]).user_error();
    // The served store answers through its control socket, with the same kinds.
    fusevol(args![
        "volume",
        "inspect",
        "--data",
        m.data(),
        "nope",
        "--json"
    ])
    .json_error("volume_not_found");
    fusevol(args!["volume", "delete", "--data", m.data(), "vol"]).user_error();
    let dirs = m.stop();
    assert_store_intact(dirs);
}

#[test]
fn help_documents_the_exit_statuses() {
    let out = fusevol(args!["--help"]).ok();
    for want in [
        "Exit status: 0 done; 1 fsck found problems, or scrub repaired a copy or misses one; 2 could not run",
        "--json",
    ] {
        assert!(
            out.stdout.contains(want),
            "--help lacks {want:?}:\n{}",
            out.stdout
        );
    }
}
