//! Helpers shared by the CLI tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn digits() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/digits")
}

/// A fresh directory under the system temp dir, named by the test binary's `prefix`, `tag` and the process id.
pub fn temp_dir(prefix: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An image folder (in `root`/data) with the first `per_class` digits of `classes`.
pub fn digits_slice(root: &Path, classes: &[&str], per_class: usize) -> PathBuf {
    let root = root.join("data");
    for c in classes {
        let dst = root.join(c);
        std::fs::create_dir_all(&dst).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(digits().join(c)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files.iter().take(per_class) {
            std::fs::copy(f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    root
}

/// Runs `beit ARGS` to the end: its exit code and stderr (which must not show a panic).
pub fn beit(args: &[String]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beit")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.code().unwrap_or(-1), err)
}

/// A training command (`args`, writing into `out`, `epochs` in all) killed with SIGKILL after 2 epochs and
/// resumed with --resume, which must succeed: how many epochs the killed run had written, and the resumed
/// run's stderr.
pub fn kill_and_resume(args: &[String], out: &Path, epochs: usize) -> (usize, String) {
    let done = run_and_kill_after_epochs(args, out, 2);
    assert!(done < epochs, "the run finished before it could be killed; make the test's epochs longer");
    let mut resume = args.to_vec();
    resume.push("--resume".into());
    let (code, err) = beit(&resume);
    assert_eq!(code, 0, "{err}");
    (done, err)
}

/// Starts `beit ARGS`, waits until `out`/metrics.jsonl has `epochs` lines (or two minutes), waits 20 ms more to
/// land inside the next epoch, and kills it with SIGKILL. Returns how many epochs it had written.
pub fn run_and_kill_after_epochs(args: &[String], out: &Path, epochs: usize) -> usize {
    let metrics = out.join("metrics.jsonl");
    let lines = || std::fs::read_to_string(&metrics).map(|t| t.lines().count()).unwrap_or(0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_beit")).args(args).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while lines() < epochs && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    lines()
}

/// A copy of a PNG whose header (IHDR) claims `width` x `height`, with the chunk checksum fixed so that only the
/// size is wrong: what a decompression bomb looks like to a decoder.
pub fn png_claiming(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

/// PNG chunk checksum (CRC-32).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}
