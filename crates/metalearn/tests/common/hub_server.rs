//! A local HTTP server that answers like the Hugging Face Hub's file endpoint
//! (`/{owner}/{model}/resolve/{revision}/{file}`, with the `ETag`, `X-Repo-Commit` and
//! `Content-Range` headers and ranged GETs that the `hf-hub` client uses), serving one model
//! folder, so that downloads by name are tested without the internet.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (folder, prefix) = (folder.to_path_buf(), format!("/{repo}/resolve/"));
        let (log, count, halt) = (requests.clone(), served.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                let mut stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&request).to_string();
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
                let response = match file.and_then(|f| std::fs::read(f).ok()) {
                    Some(body) => respond(&body, range_start),
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Error-Code: \
                              EntryNotFound\r\nConnection: close\r\n\r\n"
                        .to_vec(),
                };
                let _ = stream.write_all(&response);
                let _ = stream.flush();
            }
        });
        Self {
            endpoint,
            requests,
            served,
            stop,
            thread: Some(thread),
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
