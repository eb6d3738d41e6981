//! A one-thread HTTP/1.1 server on 127.0.0.1 for download tests: every request's head goes to
//! an answering function, whose bytes are written back before the connection closes.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running server.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// Requests answered so far.
    pub served: Arc<AtomicUsize>,
    /// Set to stop the server at its next poll.
    pub stop: Arc<AtomicBool>,
    /// The serving thread.
    pub thread: JoinHandle<()>,
}

/// Starts a server that answers each request (its request line and headers, as text) with the
/// bytes `answer` returns; it stops after `max_requests` requests, after 30 seconds, or when
/// `stop` is set, whichever comes first.
pub fn serve(max_requests: usize, answer: impl Fn(&str) -> Vec<u8> + Send + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, halt) = (served.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while count.load(Ordering::SeqCst) < max_requests
            && Instant::now() < deadline
            && !halt.load(Ordering::SeqCst)
        {
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
            let response = answer(&String::from_utf8_lossy(&request));
            let _ = stream.write_all(&response);
            let _ = stream.flush();
            // Dropping the stream closes the connection (mid-body when the answer is short).
        }
    });
    Server {
        address,
        served,
        stop,
        thread,
    }
}
