//! Connection churn: connect, 1-byte request, 1-byte response, close with the client closing
//! first (so the client keeps TIME_WAIT), from several threads; and the pieces the churn tests
//! and the benchmark share.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::{exec, spawn_within, within};

/// Pods configured as many images are for connection churn: the whole port range for
/// outgoing connections, and TIME_WAIT sockets reused for new ones (after a second).
pub fn churn_sysctls(ns: &str) -> Result<()> {
    exec(
        ns,
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"],
    )?;
    exec(ns, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(())
}

/// A namespace's SYN retransmissions so far (`TcpExt: TCPSynRetrans`).
pub fn syn_retransmissions(ns: &str) -> Result<u64> {
    let text = exec(ns, &["cat", "/proc/net/netstat"])?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = match lines.as_slice() {
        [names, values, ..] => (*names, *values),
        _ => anyhow::bail!("no TcpExt lines in /proc/net/netstat"),
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .context("TCPSynRetrans not found")
}

/// A TCP echo server with blocking acceptor threads, each serving its connections inline;
/// stopped (listener shut down, threads joined) when dropped.
pub struct EchoServer {
    listener: TcpListener,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str, addr: &str, port: u16, acceptors: usize) -> Result<Self> {
        let ip: Ipv4Addr = addr.parse()?;
        let listener = within(ns, move || TcpListener::bind((ip, port)))??;
        let mut threads = Vec::new();
        for _ in 0..acceptors {
            let listener = listener.try_clone()?;
            threads.push(std::thread::spawn(move || {
                while let Ok((mut stream, _)) = listener.accept() {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        Ok(Self { listener, threads })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // Wakes the acceptors blocked in accept().
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What one churn client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientReport {
    pub connections: u64,
    /// Failed connects, echoes that did not come back or came back wrong (first few kept).
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// The slowest connect(): a dropped SYN shows as a second or more.
    pub slowest_connect: Duration,
}

/// One connect/echo/close exchange; the client closes first. `tag` is the byte echoed.
pub fn exchange(dst: SocketAddrV4, tag: u8) -> Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))
        .with_context(|| format!("connect to {dst}"))?;
    let took = start.elapsed();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&[tag])?;
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).context("reading the echo")?;
    anyhow::ensure!(buf[0] == tag, "echo {} instead of {tag}", buf[0]);
    Ok(took)
}

/// Starts `clients` threads in `ns` looping [`exchange`] to `dst` until `stop`, pausing
/// `pause` between exchanges.
pub fn start_clients(
    ns: &str,
    dst: SocketAddrV4,
    clients: usize,
    pause: Duration,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<ClientReport>>> {
    (0..clients)
        .map(|i| {
            let stop = Arc::clone(stop);
            spawn_within(ns, move || {
                let mut r = ClientReport::default();
                let tag = u8::try_from(i % 200).unwrap_or(0) + 1;
                while !stop.load(Ordering::Relaxed) {
                    match exchange(dst, tag) {
                        Ok(took) => {
                            r.connections += 1;
                            r.slowest_connect = r.slowest_connect.max(took);
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.first_errors.len() < 3 {
                                r.first_errors.push(format!("{e:#}"));
                            }
                        }
                    }
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                r
            })
        })
        .collect()
}

/// Joins the clients and sums their reports.
#[must_use]
pub fn join_clients(handles: Vec<JoinHandle<ClientReport>>) -> ClientReport {
    let mut total = ClientReport::default();
    for h in handles {
        let r = h.join().unwrap_or_else(|_| ClientReport {
            errors: 1,
            first_errors: vec!["client thread panicked".into()],
            ..ClientReport::default()
        });
        total.connections += r.connections;
        total.errors += r.errors;
        total.first_errors.extend(r.first_errors);
        total.slowest_connect = total.slowest_connect.max(r.slowest_connect);
    }
    total
}
