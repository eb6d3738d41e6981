//! Downloads of public data sets with checksum verification.
//!
//! Each file is streamed to a temporary file in the target folder while its MD5 is computed,
//! and renamed to its final name only once the checksum matches, so an interrupted or corrupt
//! download never leaves a file under the final name. A file already there with the right
//! checksum is not downloaded again. Files without a published checksum are accepted when they
//! are non-empty, readable zip archives.
//!
//! [`omniglot_files`] lists the Omniglot archives of the data set's public repository
//! (`python/` folder); the table is a parameter of [`fetch_files`], so other files (or test
//! checksums) can be used.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fsutil::temp_sibling;

/// Where the Omniglot archives are published (the repository's `python/` folder, raw files).
pub const OMNIGLOT_BASE_URL: &str =
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python";

/// One file to download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path below the base URL, e.g. `images_background.zip` or
    /// `one-shot-classification/all_runs.zip`; the local name is its last component.
    pub path: String,
    /// Expected MD5 (lower-case hex), if published; without it the file must be a valid zip.
    pub md5: Option<String>,
}

impl RemoteFile {
    /// A file with a known MD5.
    pub fn with_md5(path: &str, md5: &str) -> Self {
        Self {
            path: path.into(),
            md5: Some(md5.to_ascii_lowercase()),
        }
    }

    /// The local file name: the last component of `path`.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// The Omniglot archives: the two full splits, the two minimal background splits and the 20
/// one-shot runs (`all_runs.zip`, 352,787 bytes), each with its MD5.
pub fn omniglot_files() -> Vec<RemoteFile> {
    vec![
        RemoteFile::with_md5("images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
        RemoteFile::with_md5("images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
        RemoteFile::with_md5(
            "images_background_small1.zip",
            "e704a628b5459e08445c13499850abc4",
        ),
        RemoteFile::with_md5(
            "images_background_small2.zip",
            "b75a71a51d3b13f821f212756fe481fd",
        ),
        RemoteFile::with_md5(
            "one-shot-classification/all_runs.zip",
            "e8996daecdf12afeeb4a53a179f06b19",
        ),
    ]
}

/// How a file was checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "check")]
pub enum Verification {
    /// Its MD5 matched the expected one.
    Md5 {
        /// The MD5.
        md5: String,
    },
    /// No MD5 is published: it is a non-empty zip archive with this many entries.
    ValidZip {
        /// Its MD5, for the record.
        md5: String,
        /// Number of entries in the archive.
        entries: usize,
    },
}

/// The result for one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FetchedFile {
    /// The local file name.
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// False when a complete file with the right checksum was already there.
    pub downloaded: bool,
    /// How it was checked.
    pub verification: Verification,
}

/// Download settings.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Limit for connecting and for each read from the server.
    pub timeout: Duration,
    /// Show a progress bar per file on stderr.
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            progress: false,
        }
    }
}

/// Downloads every file of `files` from `base_url` into `dir` (created if needed), verifying
/// each; stops at the first failure, whose error names the file (and, for a checksum mismatch,
/// the expected and actual MD5s).
pub fn fetch_files(
    base_url: &str,
    dir: &Path,
    files: &[RemoteFile],
    options: &FetchOptions,
) -> Result<Vec<FetchedFile>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let agent = make_agent(base_url, options);
    files
        .iter()
        .map(|file| fetch_one(&agent, base_url, dir, file, options))
        .collect()
}

fn make_agent(base_url: &str, options: &FetchOptions) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_connect(Some(options.timeout))
        .timeout_per_read(Some(options.timeout))
        .http_status_as_error(false);
    if is_loopback(base_url) {
        // A proxy from the environment cannot reach this machine's own servers.
        config = config.proxy(None);
    }
    config.build().into()
}

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    host == "localhost" || host.starts_with("127.") || rest.starts_with("[::1]")
}

fn fetch_one(
    agent: &ureq::Agent,
    base_url: &str,
    dir: &Path,
    file: &RemoteFile,
    options: &FetchOptions,
) -> Result<FetchedFile> {
    let name = file.file_name().to_string();
    let target = dir.join(&name);
    if target.is_file() {
        if let Ok(verification) = verify(&target, file, None) {
            let bytes = std::fs::metadata(&target)
                .map_err(|e| Error::io(&target, e))?
                .len();
            return Ok(FetchedFile {
                name,
                path: target,
                bytes,
                downloaded: false,
                verification,
            });
        }
    }
    let url = format!("{}/{}", base_url.trim_end_matches('/'), file.path);
    let tmp = temp_sibling(&target);
    let result = download_to(agent, &url, &tmp, &name, options)
        .and_then(|(bytes, md5)| verify(&tmp, file, Some(&md5)).map(|v| (bytes, v)))
        .and_then(|(bytes, verification)| {
            std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
            Ok((bytes, verification))
        });
    match result {
        Ok((bytes, verification)) => Ok(FetchedFile {
            name,
            path: target,
            bytes,
            downloaded: true,
            verification,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Streams `url` into `tmp`; returns the byte count and the MD5.
fn download_to(
    agent: &ureq::Agent,
    url: &str,
    tmp: &Path,
    name: &str,
    options: &FetchOptions,
) -> Result<(u64, String)> {
    let failed = |what: String| {
        Error::Data(format!(
            "{name}: download from {url} failed: {what}; check the network (or --base-url) and \
             run the command again"
        ))
    };
    let response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(failed(format!("the server answered HTTP {status}")));
    }
    let expected_len = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut reader = response.into_body().into_reader();
    let mut out = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let bar = crate::progress::bar(
        expected_len.unwrap_or(0),
        options.progress && expected_len.is_some(),
        name,
    );
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(failed(format!(
                    "the connection broke after {total} bytes ({e})"
                )))
            }
        };
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(|e| Error::io(tmp, e))?;
        total += n as u64;
        bar.set_position(total);
    }
    bar.finish_and_clear();
    if let Some(expected) = expected_len.filter(|&e| e != total) {
        return Err(failed(format!(
            "received {total} of {expected} bytes (the connection closed early)"
        )));
    }
    out.sync_all().map_err(|e| Error::io(tmp, e))?;
    Ok((total, crate::data::omniglot::hex(&hasher.finalize())))
}

/// Checks a file against its expected MD5, or (without one) that it is a non-empty zip.
/// `md5` is the already computed digest, if any.
fn verify(path: &Path, file: &RemoteFile, md5: Option<&str>) -> Result<Verification> {
    let actual = match md5 {
        Some(m) => m.to_string(),
        None => md5_file(path)?,
    };
    let name = file.file_name();
    match &file.md5 {
        Some(expected) if *expected == actual => Ok(Verification::Md5 { md5: actual }),
        Some(expected) => Err(Error::Data(format!(
            "{name}: checksum mismatch: expected md5 {expected}, got {actual}; the download was \
             discarded, run the command again (or check --base-url)"
        ))),
        None => {
            let handle = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let size = handle.metadata().map_err(|e| Error::io(path, e))?.len();
            if size == 0 {
                return Err(Error::Data(format!(
                    "{name}: the download is empty; run the command again"
                )));
            }
            let archive = zip::ZipArchive::new(std::io::BufReader::new(handle)).map_err(|e| {
                Error::Data(format!(
                    "{name}: the download is not a valid zip archive ({e}); run the command again"
                ))
            })?;
            Ok(Verification::ValidZip {
                md5: actual,
                entries: archive.len(),
            })
        }
    }
}

/// MD5 of a file, lower-case hex.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(crate::data::omniglot::hex(&hasher.finalize()))
}

/// Unpacks a zip archive into `dest` (created if needed), skipping entries whose names would
/// leave it; returns the number of files written. Each file is written atomically.
pub fn extract_zip(archive: &Path, dest: &Path) -> Result<usize> {
    let handle = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(handle)).map_err(|e| {
        Error::Data(format!(
            "{}: not a valid zip archive ({e})",
            archive.display()
        ))
    })?;
    let mut written = 0;
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| {
            Error::Data(format!(
                "{}: entry #{index} cannot be read: {e}",
                archive.display()
            ))
        })?;
        let Some(relative) = entry.enclosed_name() else {
            continue;
        };
        let target = dest.join(&relative);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| Error::io(&target, e))?;
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| {
            Error::Data(format!(
                "{}: entry `{}` is corrupt ({e})",
                archive.display(),
                relative.display()
            ))
        })?;
        crate::fsutil::atomic_write(&target, &bytes)?;
        written += 1;
    }
    Ok(written)
}
