//! Test helpers: real failures of real files, made with the kernel's help.

/// `chattr +i` on a path for as long as this lives: every write to the file (through file
/// descriptors opened before, too) or into the directory fails with EPERM, even for root.
/// `None` (after printing why) where `chattr` cannot do it: not root, or a filesystem without
/// the flag.
pub(crate) struct Immutable(std::path::PathBuf);

impl Immutable {
    pub(crate) fn set(path: &std::path::Path) -> Option<Immutable> {
        match std::process::Command::new("chattr").arg("+i").arg(path).output() {
            Ok(out) if out.status.success() => Some(Immutable(path.to_path_buf())),
            Ok(out) => {
                eprintln!("skipped: chattr +i {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run chattr: {e}");
                None
            }
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}
