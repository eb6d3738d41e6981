//! Downloads against a small HTTP server on 127.0.0.1: verified success, checksum mismatch, a
//! connection dropped mid-file, skipping a file already there, unpacking the runs, the `data
//! fetch` command, and MovieLens-1M's conversion on a small synthetic archive in GroupLens' layout
//! (the real data may not be redistributed, so no part of it is in the repository).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use md5::{Digest, Md5};
use metalearn::data::fetch::{extract_zip, fetch_files, FetchOptions, RemoteFile, Verification};
use metalearn::data::movielens::{
    convert_movielens_1m, movielens_1m_files, LICENCE_NOTICE_FILE, MOVIELENS_BASE_URL,
    MOVIELENS_LICENCE_URL,
};

/// What the server answers for one path.
#[derive(Clone)]
struct Route {
    body: Vec<u8>,
    /// Announce the whole body but close the connection after this many bytes.
    drop_after: Option<usize>,
}

impl Route {
    fn full(body: Vec<u8>) -> Self {
        Self {
            body,
            drop_after: None,
        }
    }
}

/// A one-thread HTTP/1.1 server for `routes`; it stops by itself after `max_requests` requests
/// or 30 seconds, whichever comes first. Returns the base URL, the request counter and the
/// thread.
fn serve(
    routes: HashMap<String, Route>,
    max_requests: usize,
) -> (String, Arc<AtomicUsize>, JoinHandle<()>) {
    let server = common::http::serve(max_requests, move |request| {
        let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
        let path = path.strip_prefix("/python/").unwrap_or(&path);
        match routes.get(path) {
            Some(route) => {
                let mut response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: \
                     application/octet-stream\r\nConnection: close\r\n\r\n",
                    route.body.len()
                )
                .into_bytes();
                let sent = route.drop_after.unwrap_or(route.body.len());
                response.extend_from_slice(&route.body[..sent]);
                response
            }
            None => {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            }
        }
    });
    (
        format!("{}/python", server.address),
        server.served,
        server.thread,
    )
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small zip standing in for all_runs.zip.
fn runs_zip() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default();
    zip.start_file("run01/class_labels.txt", options).unwrap();
    zip.write_all(b"run01/test/item01.png run01/training/class01.png\n")
        .unwrap();
    zip.finish().unwrap();
    out.into_inner()
}

/// The archive to download: the real minimal Omniglot split with its published MD5 when the
/// shared data is here, else a small file with its own MD5.
fn archive_and_table() -> (String, Vec<u8>, String) {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/omniglot/images_background_small1.zip");
    match std::fs::read(&shared) {
        Ok(bytes) => (
            "images_background_small1.zip".into(),
            bytes,
            "e704a628b5459e08445c13499850abc4".into(),
        ),
        Err(_) => {
            println!(
                "shared Omniglot data not found at {}; serving a small generated file instead",
                shared.display()
            );
            let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let md5 = md5_hex(&bytes);
            ("images_background_small1.zip".into(), bytes, md5)
        }
    }
}

/// Files in `dir` (names), sorted: no temporary file may be left behind.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn quick() -> FetchOptions {
    FetchOptions {
        timeout: Duration::from_secs(10),
        progress: false,
    }
}

#[test]
fn downloads_verify_and_a_second_fetch_skips_good_files() {
    let (name, bytes, md5) = archive_and_table();
    let runs = runs_zip();
    let routes = HashMap::from([
        (name.clone(), Route::full(bytes.clone())),
        (
            "one-shot-classification/all_runs.zip".to_string(),
            Route::full(runs.clone()),
        ),
    ]);
    let (base, served, server) = serve(routes, 3);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("omniglot");
    let table = vec![
        RemoteFile::with_md5(&name, &md5),
        RemoteFile {
            path: "one-shot-classification/all_runs.zip".into(),
            md5: None,
        },
    ];
    let fetched = fetch_files(&base, &target, &table, &quick()).unwrap();
    assert_eq!(served.load(Ordering::SeqCst), 2);
    assert_eq!(fetched.len(), 2);
    assert!(fetched.iter().all(|f| f.downloaded));
    assert_eq!(
        fetched[0].verification,
        Verification::Md5 { md5: md5.clone() }
    );
    assert_eq!(fetched[0].bytes, bytes.len() as u64);
    assert_eq!(std::fs::read(target.join(&name)).unwrap(), bytes);
    match &fetched[1].verification {
        Verification::ValidZip { entries, md5 } => {
            assert_eq!(*entries, 1);
            assert_eq!(*md5, md5_hex(&runs));
        }
        other => panic!("all_runs.zip has no published md5: {other:?}"),
    }
    assert_eq!(
        listing(&target),
        vec!["all_runs.zip".to_string(), name.clone()]
    );

    // Everything is there and verifies: nothing is requested again.
    let again = fetch_files(&base, &target, &table, &quick()).unwrap();
    assert!(again.iter().all(|f| !f.downloaded));
    assert_eq!(again[0].verification, fetched[0].verification);
    assert_eq!(
        served.load(Ordering::SeqCst),
        2,
        "no request for files already there"
    );

    // A damaged file under the final name is downloaded again and replaced.
    std::fs::write(target.join(&name), b"damaged").unwrap();
    let repaired = fetch_files(&base, &target, &table[..1], &quick()).unwrap();
    assert!(repaired[0].downloaded);
    assert_eq!(std::fs::read(target.join(&name)).unwrap(), bytes);
    server.join().unwrap();
}

#[test]
fn checksum_mismatch_keeps_no_file_and_names_both_checksums() {
    let body = b"these bytes do not have the expected checksum".to_vec();
    let actual = md5_hex(&body);
    let (base, _served, server) = serve(
        HashMap::from([("images_evaluation.zip".to_string(), Route::full(body))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let wrong = "0123456789abcdef0123456789abcdef";
    let err = fetch_files(
        &base,
        dir.path(),
        &[RemoteFile::with_md5("images_evaluation.zip", wrong)],
        &quick(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("images_evaluation.zip"), "{err}");
    assert!(err.contains(wrong) && err.contains(&actual), "{err}");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    server.join().unwrap();
}

#[test]
fn a_connection_dropped_mid_file_leaves_no_file() {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 256) as u8).collect();
    let md5 = md5_hex(&body);
    let (base, _served, server) = serve(
        HashMap::from([(
            "images_background.zip".to_string(),
            Route {
                body,
                drop_after: Some(100_000),
            },
        )]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let err = fetch_files(
        &base,
        dir.path(),
        &[RemoteFile::with_md5("images_background.zip", &md5)],
        &quick(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("images_background.zip"), "{err}");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    server.join().unwrap();
}

#[test]
fn missing_files_and_invalid_unchecked_archives_are_errors() {
    let (base, _served, server) = serve(
        HashMap::from([
            (
                "all_runs.zip".to_string(),
                Route::full(b"not a zip".to_vec()),
            ),
            ("empty.zip".to_string(), Route::full(Vec::new())),
        ]),
        3,
    );
    let dir = tempfile::tempdir().unwrap();
    let unchecked = |path: &str| RemoteFile {
        path: path.into(),
        md5: None,
    };
    let err = fetch_files(&base, dir.path(), &[unchecked("all_runs.zip")], &quick())
        .unwrap_err()
        .to_string();
    assert!(err.contains("all_runs.zip") && err.contains("zip"), "{err}");
    let err = fetch_files(&base, dir.path(), &[unchecked("empty.zip")], &quick())
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.zip") && err.contains("empty"), "{err}");
    let err = fetch_files(&base, dir.path(), &[unchecked("nowhere.zip")], &quick())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere.zip") && err.contains("404"), "{err}");
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    server.join().unwrap();
}

/// Runs `metalearn data fetch omniglot` against `base` into `dir`.
fn fetch_command(base: &str, dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metalearn"))
        .args(["data", "fetch", "omniglot", "--dir"])
        .arg(dir)
        .args(["--base-url", base])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn data_fetch_command_checks_the_runs_against_their_md5() {
    // The built-in table knows the MD5 of the real all_runs.zip, so a stand-in is refused.
    let runs = runs_zip();
    let actual = md5_hex(&runs);
    let (base, _served, server) = serve(
        HashMap::from([(
            "one-shot-classification/all_runs.zip".to_string(),
            Route::full(runs),
        )]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target: PathBuf = dir.path().join("omniglot");
    let out = fetch_command(&base, &target, &["--only", "all_runs.zip"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("all_runs.zip")
            && stderr.contains("e8996daecdf12afeeb4a53a179f06b19")
            && stderr.contains(&actual),
        "{stderr}"
    );
    assert!(listing(&target).is_empty(), "{:?}", listing(&target));
    server.join().unwrap();

    // A file name that is not part of the data set is refused before any download.
    let out = fetch_command(&base, &target, &["--only", "mnist.zip"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mnist.zip") && stderr.contains("images_background.zip"),
        "{stderr}"
    );
}

#[test]
fn data_fetch_command_verifies_a_real_archive() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/omniglot/images_background_small1.zip");
    let Ok(bytes) = std::fs::read(&shared) else {
        println!(
            "shared Omniglot data not found at {}; the command's success path is checked by \
             the library tests only",
            shared.display()
        );
        return;
    };
    let (base, _served, server) = serve(
        HashMap::from([(
            "images_background_small1.zip".to_string(),
            Route::full(bytes.clone()),
        )]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target: PathBuf = dir.path().join("omniglot");
    let out = fetch_command(
        &base,
        &target,
        &["--only", "images_background_small1.zip", "--json"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["files"][0]["name"], "images_background_small1.zip");
    assert_eq!(last["files"][0]["verification"]["check"], "md5");
    assert!(last["runs_folder"].is_null());
    assert_eq!(
        std::fs::read(target.join("images_background_small1.zip")).unwrap(),
        bytes
    );
    server.join().unwrap();
}

#[test]
fn runs_archives_unpack_below_the_target_only() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("all_runs.zip");
    let mut out = std::io::Cursor::new(runs_zip());
    {
        // Append an entry whose name would leave the target folder.
        let mut zip = zip::ZipWriter::new_append(&mut out).unwrap();
        zip.start_file("../escaped.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(b"outside").unwrap();
        zip.finish().unwrap();
    }
    std::fs::write(&archive, out.into_inner()).unwrap();
    let dest = dir.path().join("unpacked").join("all_runs");
    assert_eq!(extract_zip(&archive, &dest).unwrap(), 1);
    assert_eq!(
        std::fs::read_to_string(dest.join("run01/class_labels.txt")).unwrap(),
        "run01/test/item01.png run01/training/class01.png\n"
    );
    assert!(!dir.path().join("unpacked/escaped.txt").exists());
    assert!(!dir.path().join("escaped.txt").exists());
}

/// Runs `metalearn data fetch clinc150` against `base` into `dir`.
fn fetch_clinc(base: &str, dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metalearn"))
        .args(["data", "fetch", "clinc150", "--dir"])
        .arg(dir)
        .args(["--base-url", base, "--json"])
        .output()
        .unwrap()
}

#[test]
fn clinc150_fetch_refuses_a_file_with_another_md5() {
    let body =
        br#"{"train": [], "val": [], "test": [], "oos_train": [], "oos_val": [], "oos_test": []}"#;
    let actual = md5_hex(body);
    let (base, _served, server) = serve(
        HashMap::from([("data_full.json".to_string(), Route::full(body.to_vec()))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("clinc150");
    let out = fetch_clinc(&base, &target);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("data_full.json")
            && stderr.contains("30c29dc6ab78edf3b5dfa640be204cde")
            && stderr.contains(&actual),
        "{stderr}"
    );
    assert!(listing(&target).is_empty(), "{:?}", listing(&target));
    server.join().unwrap();
}

#[test]
fn clinc150_fetch_writes_the_csv_files() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/clinc150");
    let (Ok(full), Ok(domains)) = (
        std::fs::read(shared.join("data_full.json")),
        std::fs::read(shared.join("domains.json")),
    ) else {
        println!(
            "shared CLINC150 data not found at {}; the CSV conversion is checked by the \
             library tests on small files",
            shared.display()
        );
        return;
    };
    let (base, _served, server) = serve(
        HashMap::from([
            ("data_full.json".to_string(), Route::full(full)),
            ("domains.json".to_string(), Route::full(domains)),
        ]),
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("clinc150");
    let out = fetch_clinc(&base, &target);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.join().unwrap();
    for (name, rows) in [
        ("train.csv", 15_100),
        ("val.csv", 3_100),
        ("test.csv", 5_500),
    ] {
        let text = std::fs::read_to_string(target.join(name)).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        assert_eq!(reader.headers().unwrap(), vec!["text", "intent", "domain"]);
        let records: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(records.len(), rows, "{name}");
        let oos = records.iter().filter(|r| &r[1] == "oos").count();
        assert_eq!(oos, if name == "test.csv" { 1_000 } else { 100 }, "{name}");
    }
}

/// A zip in GroupLens' MovieLens-1M layout (`ml-1m/*.dat`) holding these files' bytes.
fn movielens_zip(users: &[u8], movies: &[u8], ratings: &[u8]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in [
        (
            "ml-1m/README",
            b"a synthetic stand-in for tests\n".as_slice(),
        ),
        ("ml-1m/movies.dat", movies),
        ("ml-1m/ratings.dat", ratings),
        ("ml-1m/users.dat", users),
    ] {
        zip.start_file(name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    out.into_inner()
}

const ML_USERS: &[u8] = b"1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-4321\n";
/// `Mis\xe9rables` is `Misérables` in ISO-8859-1, as in GroupLens' movies.dat.
const ML_MOVIES: &[u8] = b"1::Toy Story (1995)::Animation|Children's|Comedy\n\
    73::Mis\xe9rables, Les (1995)::Drama|Musical\n\
    2858::American Beauty (1999)::Comedy|Drama\n\
    9000::No Year Here::Documentary\n";
const ML_RATINGS: &[u8] = b"1::1::5::978824291\n\
    3::2858::4::978298413\n\
    2::73::3::978300760\n\
    1::2858::4::978302109\n";

/// Runs `metalearn data fetch movielens-1m` against `base` into `dir`.
fn fetch_movielens(base: &str, dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_metalearn"))
        .args(["data", "fetch", "movielens-1m", "--dir"])
        .arg(dir)
        .args(["--base-url", base])
        .output()
        .unwrap()
}

#[test]
fn movielens_table_is_the_published_archive() {
    let files = movielens_1m_files();
    assert_eq!(files.len(), 1);
    assert_eq!(
        format!("{MOVIELENS_BASE_URL}/{}", files[0].path),
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    );
    assert_eq!(
        files[0].md5.as_deref(),
        Some("c4d9eecfca2ab87c1945afe126590906")
    );
}

#[test]
fn movielens_fetch_refuses_a_zip_with_another_md5_and_leaves_nothing() {
    let body = movielens_zip(ML_USERS, ML_MOVIES, ML_RATINGS);
    let actual = md5_hex(&body);
    let (base, served, server) = serve(
        HashMap::from([("ml-1m.zip".to_string(), Route::full(body))]),
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("movielens-1m");
    for _ in 0..2 {
        let out = fetch_movielens(&base, &target);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("ml-1m.zip")
                && stderr.contains("c4d9eecfca2ab87c1945afe126590906")
                && stderr.contains(&actual),
            "{stderr}"
        );
        // The licence is shown before the download, and not recorded as shown when the
        // download fails: the next try shows it again.
        assert!(
            stdout.contains("Harper") && stdout.contains(MOVIELENS_LICENCE_URL),
            "{stdout}"
        );
        assert!(listing(&target).is_empty(), "{:?}", listing(&target));
    }
    assert_eq!(served.load(Ordering::SeqCst), 2);
    server.join().unwrap();
}

/// Reads a CSV file written by the converter, header included.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap();
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[test]
fn movielens_zip_with_its_checksum_is_fetched_and_converted() {
    // The command only accepts the published MD5; a download checked against the synthetic
    // archive's own MD5 goes through the same library calls.
    let body = movielens_zip(ML_USERS, ML_MOVIES, ML_RATINGS);
    let (base, _served, server) = serve(
        HashMap::from([("ml-1m.zip".to_string(), Route::full(body.clone()))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("movielens-1m");
    let table = [RemoteFile::with_md5(
        &movielens_1m_files()[0].path,
        &md5_hex(&body),
    )];
    let fetched = fetch_files(&base, &target, &table, &quick()).unwrap();
    server.join().unwrap();
    assert!(fetched[0].downloaded);
    let summary = convert_movielens_1m(&fetched[0].path, &target).unwrap();
    assert_eq!(
        (summary.users, summary.items, summary.ratings),
        (3, 4, 4),
        "{summary:?}"
    );
    assert_eq!(
        listing(&target),
        vec!["items.csv", "ml-1m.zip", "ratings.csv", "users.csv"]
    );
    assert_eq!(
        csv_rows(&target.join("users.csv")),
        vec![
            vec!["user", "gender", "age", "occupation", "zip"],
            vec!["1", "F", "1", "10", "48067"],
            vec!["2", "M", "56", "16", "70072"],
            vec!["3", "M", "25", "15", "55117"],
        ]
    );
    let items = std::fs::read_to_string(target.join("items.csv")).unwrap();
    assert!(
        items.contains("73,\"Misérables, Les (1995)\",1995,Drama|Musical\n"),
        "the latin-1 title is UTF-8 and the comma is quoted: {items}"
    );
    assert_eq!(
        csv_rows(&target.join("items.csv")),
        vec![
            vec!["item", "title", "year", "genres"],
            vec![
                "1",
                "Toy Story (1995)",
                "1995",
                "Animation|Children's|Comedy"
            ],
            vec!["73", "Misérables, Les (1995)", "1995", "Drama|Musical"],
            vec!["2858", "American Beauty (1999)", "1999", "Comedy|Drama"],
            vec!["9000", "No Year Here", "", "Documentary"],
        ]
    );
    assert_eq!(
        csv_rows(&target.join("ratings.csv")),
        vec![
            vec!["user", "item", "rating", "timestamp"],
            vec!["1", "1", "5", "978824291"],
            vec!["3", "2858", "4", "978298413"],
            vec!["2", "73", "3", "978300760"],
            vec!["1", "2858", "4", "978302109"],
        ]
    );
}

#[test]
fn movielens_malformed_line_is_an_error_naming_file_and_line() {
    let ratings = b"1::1::5::978824291\n3::2858::4\n";
    let body = movielens_zip(ML_USERS, ML_MOVIES, ratings);
    let (base, _served, server) = serve(
        HashMap::from([("ml-1m.zip".to_string(), Route::full(body.clone()))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("movielens-1m");
    let table = [RemoteFile::with_md5("ml-1m.zip", &md5_hex(&body))];
    let fetched = fetch_files(&base, &target, &table, &quick()).unwrap();
    server.join().unwrap();
    let err = convert_movielens_1m(&fetched[0].path, &target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ml-1m/ratings.dat, line 2"), "{err}");
    assert!(
        err.contains("UserID::MovieID::Rating::Timestamp") && err.contains("found 3 fields"),
        "{err}"
    );
    assert_eq!(
        listing(&target),
        vec!["ml-1m.zip"],
        "no CSV file is written"
    );
}

#[test]
fn movielens_fetch_command_converts_the_real_archive_and_shows_the_licence_once() {
    // MovieLens' licence forbids redistribution, so no copy sits beside the repository: a
    // developer who downloaded the archive points METALEARN_ML_1M_ZIP at it.
    let archive = std::env::var_os("METALEARN_ML_1M_ZIP").map(std::path::PathBuf::from);
    let Some(Ok(bytes)) = archive.as_ref().map(std::fs::read) else {
        println!(
            "METALEARN_ML_1M_ZIP does not name a readable ml-1m.zip; the conversion is checked \
             on a synthetic archive (the command's success path needs the published one, whose \
             MD5 it checks)"
        );
        return;
    };
    let (base, served, server) = serve(
        HashMap::from([("ml-1m.zip".to_string(), Route::full(bytes))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("movielens-1m");
    let first = fetch_movielens(&base, &target);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains(MOVIELENS_LICENCE_URL), "{stdout}");
    for expected in ["6040 users", "3883 movies", "1000209 ratings"] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    assert!(target.join(LICENCE_NOTICE_FILE).is_file());
    // Again: the archive is there and verifies, the licence is not shown a second time.
    let second = fetch_movielens(&base, &target);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{stdout}");
    assert!(!stdout.contains(MOVIELENS_LICENCE_URL), "{stdout}");
    assert!(stdout.contains("already present"), "{stdout}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
    server.join().unwrap();
}

#[test]
fn movielens_licence_is_not_shown_again_in_a_folder_that_recorded_it() {
    let body = movielens_zip(ML_USERS, ML_MOVIES, ML_RATINGS);
    let (base, _served, server) = serve(
        HashMap::from([("ml-1m.zip".to_string(), Route::full(body))]),
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("movielens-1m");
    metalearn::data::movielens::record_licence_notice(&target).unwrap();
    let out = fetch_movielens(&base, &target);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the synthetic archive has another md5"
    );
    assert!(!stdout.contains(MOVIELENS_LICENCE_URL), "{stdout}");
    assert_eq!(listing(&target), vec![LICENCE_NOTICE_FILE]);
    server.join().unwrap();
}
