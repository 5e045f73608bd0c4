//! `pixmesh submit`, the command-line client, against a real system: a folder of images in,
//! results out, a failure named with its reason, and a second run that redoes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::{System, jpeg, pixmesh_bin};
use std::path::Path;
use std::process::Output;

async fn jobs(system: &System) -> u64 {
    pixmesh_e2e::job_store(system).await.counts().await.unwrap().iter().map(|(_, n)| n).sum()
}

fn submit(system: &System, args: &[&str], env: bool) -> Output {
    let mut cmd = std::process::Command::new(pixmesh_bin());
    cmd.arg("submit").args(args);
    if env {
        cmd.env("PIXMESH_URL", &system.gateway).env("PIXMESH_API_KEY", &system.api_key);
    } else {
        cmd.args(["--url", &system.gateway, "--key", &system.api_key]);
    }
    cmd.output().unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_uploads_a_folder_downloads_the_results_and_a_rerun_redoes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(&dir.path().join("system"), 2, &[]).await.unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("more")).unwrap();
    std::fs::write(photos.join("one.jpg"), jpeg(120, 80)).unwrap();
    std::fs::write(photos.join("two.jpeg"), jpeg(90, 60)).unwrap();
    std::fs::write(photos.join("more/three.jpg"), jpeg(60, 90)).unwrap();
    std::fs::write(photos.join("broken.jpg"), b"this is not a JPEG").unwrap();
    std::fs::write(photos.join("notes.txt"), b"left alone").unwrap();
    let out = dir.path().join("out");
    let out_arg = out.to_string_lossy().into_owned();
    let photos_arg = photos.to_string_lossy().into_owned();

    let first = submit(&system, &[&photos_arg, "-q", "width=32&format=png", "-o", &out_arg, "-j", "3"], false);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert_eq!(first.status.code(), Some(1), "a file failed: {stdout}\n{}", String::from_utf8_lossy(&first.stderr));
    assert!(stdout.contains("3 done") && stdout.contains("1 failed"), "{stdout}");
    assert!(stdout.contains("broken.jpg") && stdout.contains("unsupported_format"), "the reason is named: {stdout}");
    assert_eq!(listing(&out), vec!["one.png", "three.png", "two.png"]);
    let made = image::open(out.join("one.png")).unwrap();
    assert_eq!((made.width(), made.height()), (32, 21));
    let after_first = jobs(&system).await;
    assert_eq!(after_first, 3, "the broken file never became a job");

    // Again, from the environment: what is there is skipped, nothing is made twice.
    let second = submit(&system, &[&photos_arg, "-q", "width=32&format=png", "-o", &out_arg], true);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("0 done") && stdout.contains("3 skipped"), "{stdout}");
    // A result lost since (or a run cut off before its download): its job is the first one.
    std::fs::remove_file(out.join("two.png")).unwrap();
    let third = submit(&system, &[&photos_arg, "-q", "width=32&format=png", "-o", &out_arg], true);
    let stdout = String::from_utf8_lossy(&third.stdout);
    assert!(stdout.contains("1 done") && stdout.contains("2 skipped"), "{stdout}");
    assert!(out.join("two.png").is_file());
    assert_eq!(jobs(&system).await, after_first, "no job was made again");

    // Named outputs: a file per output.
    let outputs = dir.path().join("outputs");
    let one = photos.join("one.jpg").to_string_lossy().into_owned();
    let fourth = submit(&system, &[&one, "-q", "outputs=small:width=16;big:width=64,format=webp", "-o", &outputs.to_string_lossy()], false);
    assert!(fourth.status.success(), "{}", String::from_utf8_lossy(&fourth.stdout));
    assert_eq!(listing(&outputs), vec!["one.big.webp", "one.small.jpg"]);

    // Bad use: a clear error, and the configuration exit code.
    let none = submit(&system, &[&dir.path().join("missing").to_string_lossy()], false);
    assert_eq!(none.status.code(), Some(64), "{}", String::from_utf8_lossy(&none.stderr));
    assert!(String::from_utf8_lossy(&none.stderr).contains("cannot read"));
    system.stop().await.unwrap();
}
