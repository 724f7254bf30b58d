//! Where a PersistentVolume lives on its node's host filesystem.
//!
//! Each agent has a root directory on the host (`/var/lib/fusevol` in `deploy/`, published as
//! `spec.root` of the node's [`FusevolNode`](super::crd::FusevolNode), so the controller never
//! assumes a cluster-wide constant). Under it:
//!
//! ```text
//! <root>/volumes/<pv>/             one directory per PV, created by the agent
//! <root>/volumes/<pv>/mnt          the FUSE mount point: an EMPTY directory on the host
//! <root>/volumes/<pv>/mnt/data     the PV's spec.local.path: a directory INSIDE the volume
//! ```
//!
//! The PV points at `mnt/data`, not at the mount point, so that a pod can never start on the
//! bare host directory: `data` exists only in the volume's filesystem (the agent creates it at
//! the volume's root the first time it serves the volume). While the agent does not serve the
//! volume, `mnt` is an empty host directory and `mnt/data` does not exist, so kubelet's bind
//! mount fails with "no such file or directory" and kubelet retries until the agent serves it;
//! if the FUSE server died, stat fails with "transport endpoint is not connected", again an
//! error rather than a silent write to the host disk outside any quota. The agent must keep the
//! host-side `mnt` empty (refuse to mount over a non-empty directory), so that nothing can make
//! `mnt/data` exist on the host itself.

/// Directory under the agent root that holds one directory per PV.
pub const VOLUMES_DIR: &str = "volumes";
/// Name of the FUSE mount point inside a PV's directory.
pub const MOUNT_DIR: &str = "mnt";
/// Name of the directory at the root of the volume's filesystem that pods see.
pub const DATA_DIR: &str = "data";

/// The host paths of one PV under an agent root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePaths {
    /// `<root>/volumes/<pv>`: owned by the agent.
    pub dir: String,
    /// `<root>/volumes/<pv>/mnt`: where the agent mounts the FUSE filesystem.
    pub mount_point: String,
    /// `<root>/volumes/<pv>/mnt/data`: the PV's `spec.local.path`.
    pub local_path: String,
}

/// The paths of PV `pv_name` under agent root `root` (trailing slashes of `root` ignored).
pub fn volume_paths(root: &str, pv_name: &str) -> VolumePaths {
    let root = root.trim_end_matches('/');
    let dir = format!("{root}/{VOLUMES_DIR}/{pv_name}");
    let mount_point = format!("{dir}/{MOUNT_DIR}");
    let local_path = format!("{mount_point}/{DATA_DIR}");
    VolumePaths {
        dir,
        mount_point,
        local_path,
    }
}

/// Host directories an agent root may never be or lie under: a PV path built there would
/// hand a pod the host's system files.
const FORBIDDEN_ROOTS: [&str; 8] = [
    "/proc", "/sys", "/dev", "/etc", "/boot", "/root", "/run", "/usr",
];

/// Checks a node's published root as the agent's own config does (an absolute path) and
/// more: normalized (no `.`, `..` or empty components; one trailing slash is fine), printable ASCII without
/// spaces, at most 255 bytes, not `/` and not inside a system directory. The controller
/// builds every PV path of the node under it.
pub fn validate_root(root: &str) -> Result<(), String> {
    if !root.starts_with('/') {
        return Err("not an absolute path".into());
    }
    if root.len() > 255 {
        return Err("longer than 255 bytes".into());
    }
    if !root.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces is allowed".into());
    }
    // One trailing slash is harmless (volume_paths trims it).
    let root = root.strip_suffix('/').unwrap_or(root);
    let parts: Vec<&str> = root.get(1..).unwrap_or_default().split('/').collect();
    if root.is_empty()
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err("not a normalized path below /".into());
    }
    if let Some(sys) = FORBIDDEN_ROOTS
        .iter()
        .find(|f| root == **f || root.starts_with(&format!("{f}/")))
    {
        return Err(format!("inside the system directory {sys}"));
    }
    Ok(())
}

/// The PV name encoded in a `spec.local.path` under `root`, if the path has fusevol's layout.
/// The agent uses it to check that a PV it is asked to serve really is one of its own.
pub fn pv_name_from_local_path<'a>(root: &str, local_path: &'a str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = local_path.strip_prefix(root)?.strip_prefix('/')?;
    let rest = rest.strip_prefix(VOLUMES_DIR)?.strip_prefix('/')?;
    let (name, tail) = rest.split_once('/')?;
    let expected_tail = format!("{MOUNT_DIR}/{DATA_DIR}");
    (!name.is_empty() && name != "." && name != ".." && tail == expected_tail).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pv_path_is_a_directory_inside_the_mount_point() {
        let paths = volume_paths("/var/lib/fusevol/", "pvc-1234");
        assert_eq!(paths.dir, "/var/lib/fusevol/volumes/pvc-1234");
        assert_eq!(paths.mount_point, "/var/lib/fusevol/volumes/pvc-1234/mnt");
        assert_eq!(
            paths.local_path,
            "/var/lib/fusevol/volumes/pvc-1234/mnt/data"
        );
        assert!(paths
            .local_path
            .starts_with(&format!("{}/", paths.mount_point)));
    }

    #[test]
    fn a_published_root_is_used_only_when_it_is_a_plain_directory_below_slash() {
        for good in [
            "/var/lib/fusevol",
            "/srv/fv/",
            "/tmp/e2e-1/nodes/node-a/root",
            "/data",
        ] {
            assert_eq!(validate_root(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "relative",
            "/",
            "//",
            "/var/lib/../../etc",
            "/var//lib",
            "/a/./b",
            "/etc",
            "/etc/kubernetes",
            "/proc/1",
            "/sys",
            "/dev/shm",
            "/root",
            "/usr/lib",
            "/with space",
            "/tab\there",
        ] {
            assert!(validate_root(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_root(&format!("/{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn a_local_path_maps_back_to_its_pv_name_only_with_the_exact_layout() {
        let root = "/srv/fv";
        let path = volume_paths(root, "pvc-9").local_path;
        assert_eq!(pv_name_from_local_path(root, &path), Some("pvc-9"));
        assert_eq!(pv_name_from_local_path("/srv/fv/", &path), Some("pvc-9"));
        for other in [
            "/srv/fv/volumes/pvc-9/mnt",
            "/srv/fv/volumes/pvc-9/mnt/data/x",
            "/srv/fvx/volumes/pvc-9/mnt/data",
            "/srv/fv/volumes/../mnt/data",
            "/other/volumes/pvc-9/mnt/data",
        ] {
            assert_eq!(pv_name_from_local_path(root, other), None, "{other}");
        }
    }
}
