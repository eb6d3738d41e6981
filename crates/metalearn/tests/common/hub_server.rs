//! A local HTTP server that answers like the Hugging Face Hub's file endpoint
//! (`/{owner}/{model}/resolve/{revision}/{file}`, with the `ETag`, `X-Repo-Commit` and
//! `Content-Range` headers and ranged GETs that the `hf-hub` client uses), serving one model
//! folder, so that downloads by name are tested without the internet.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::http::serve;

/// The commit hash the server reports for every file.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A running server; it stops when dropped.
pub struct HubServer {
    /// `http://127.0.0.1:PORT`, the value for `HF_ENDPOINT`.
    pub endpoint: String,
    /// Paths requested so far.
    pub requests: Arc<Mutex<Vec<String>>>,
    served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    /// Serves the files of `folder` as model `repo` (e.g. `tiny/encoder`) at any revision.
    pub fn start(folder: &Path, repo: &str) -> Self {
        let (folder, prefix) = (folder.to_path_buf(), format!("/{repo}/resolve/"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let server = serve(usize::MAX, move |text| {
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path.clone());
            let range_start = text.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                if !name.trim().eq_ignore_ascii_case("range") {
                    return None;
                }
                let spec = value.trim().strip_prefix("bytes=")?;
                let (start, end) = spec.split_once('-')?;
                Some((start.parse::<usize>().ok()?, end.parse::<usize>().ok()))
            });
            let file = path
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
                .map(|(_revision, file)| folder.join(file));
            match file.and_then(|f| std::fs::read(f).ok()) {
                Some(body) => respond(&body, range_start),
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Error-Code: \
                          EntryNotFound\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            }
        });
        Self {
            endpoint: server.address,
            requests,
            served: server.served,
            stop: server.stop,
            thread: Some(server.thread),
        }
    }

    /// How many requests were answered.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The answer for a file: the whole body, or the requested range with `206 Partial Content`.
fn respond(body: &[u8], range: Option<(usize, Option<usize>)>) -> Vec<u8> {
    let etag = format!("{:016x}", fnv(body));
    let (status, part, content_range) = match range {
        Some((start, end)) => {
            let start = start.min(body.len());
            let end = end
                .map(|e| e + 1)
                .unwrap_or(body.len())
                .min(body.len())
                .max(start);
            (
                "206 Partial Content",
                &body[start..end],
                format!(
                    "Content-Range: bytes {start}-{}/{}\r\n",
                    end.saturating_sub(1),
                    body.len()
                ),
            )
        }
        None => ("200 OK", body, String::new()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: \
         {COMMIT}\r\n{content_range}Content-Type: application/octet-stream\r\nConnection: \
         close\r\n\r\n",
        part.len()
    )
    .into_bytes();
    response.extend_from_slice(part);
    response
}

/// A content hash for the ETag (any stable hash does; the Hub uses the file's SHA-256 or git
/// blob id).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The folder a downloaded model lands in, inside the cache `hub_cache`.
pub fn snapshot_folder(hub_cache: &Path, repo: &str) -> PathBuf {
    hub_cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}
