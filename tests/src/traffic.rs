//! Real traffic for the lab: servers and clients on threads inside namespaces.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::{spawn_within, within};

/// A server running in a namespace until dropped; records the peers it saw.
pub struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a TCP connection to the server does.
#[derive(Clone, Copy)]
pub enum TcpService {
    /// Echoes bytes back.
    Echo,
    /// Reads everything, then writes back the FNV-1a hash of what it read (8 bytes, BE).
    HashSink,
    /// Writes `n` deterministic bytes, then closes.
    Source(usize),
}

/// FNV-1a over `data`, continuing from `hash` (start with `FNV_START`).
#[must_use]
pub fn fnv1a(mut hash: u64, data: &[u8]) -> u64 {
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// Deterministic payload byte `i`.
#[must_use]
pub fn payload_byte(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

impl Server {
    pub fn tcp(ns: &str, port: u16, service: TcpService) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let listener = within(ns, move || TcpListener::bind(("0.0.0.0", port)))??;
        listener.set_nonblocking(true)?;
        let (stop2, peers2) = (Arc::clone(&stop), Arc::clone(&peers));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        peers2.lock().unwrap().push(peer);
                        std::thread::spawn(move || serve_tcp(stream, service));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// A UDP server answering each datagram with the same bytes.
    pub fn udp_echo(ns: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let socket = within(ns, move || UdpSocket::bind(("0.0.0.0", port)))??;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let (stop2, peers2) = (Arc::clone(&stop), Arc::clone(&peers));
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    peers2.lock().unwrap().push(peer);
                    let _ = socket.send_to(&buf[..n], peer);
                }
            }
        });
        Ok(Self {
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// Distinct peer addresses seen so far.
    #[must_use]
    pub fn peer_ips(&self) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| match p {
                SocketAddr::V4(v4) => Some(*v4.ip()),
                SocketAddr::V6(_) => None,
            })
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    #[must_use]
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_tcp(mut stream: TcpStream, service: TcpService) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 65536];
    match service {
        TcpService::Echo => loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        },
        TcpService::HashSink => {
            let mut hash = FNV_START;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => hash = fnv1a(hash, &buf[..n]),
                }
            }
            let _ = stream.write_all(&hash.to_be_bytes());
        }
        TcpService::Source(n) => {
            let data: Vec<u8> = (0..n).map(payload_byte).collect();
            let _ = stream.write_all(&data);
        }
    }
}

/// A TCP client in namespace `ns`: connects, optionally binding `local_port`.
pub fn tcp_connect(ns: &str, dst: &str, port: u16, local_port: Option<u16>) -> Result<TcpStream> {
    let dst: Ipv4Addr = dst.parse()?;
    within(ns, move || -> Result<TcpStream> {
        let addr = SocketAddrV4::new(dst, port);
        let stream = match local_port {
            None => TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?,
            Some(lp) => connect_from(addr, lp)?,
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    })?
}

/// Connects from a fixed local port (SO_REUSEADDR, bind, connect).
fn connect_from(dst: SocketAddrV4, local_port: u16) -> Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket calls on a descriptor we own; handed to TcpStream at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_port = local_port.to_be();
        let rc = libc::bind(
            fd,
            (&raw const local).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            anyhow::bail!("bind :{local_port}: {e}");
        }
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = dst.port().to_be();
        remote.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
        let rc = libc::connect(
            fd,
            (&raw const remote).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            anyhow::bail!("connect {dst}: {e}");
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Sends `msg` over `stream` and reads the echo back.
pub fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> Result<()> {
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).context("reading the echo")?;
    anyhow::ensure!(back == msg, "echo differs");
    Ok(())
}

/// One UDP request/response from namespace `ns` (optionally from `local_port`); returns the
/// reply.
pub fn udp_request(ns: &str, dst: &str, port: u16, local_port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    let dst: Ipv4Addr = dst.parse()?;
    let msg = msg.to_vec();
    within(ns, move || -> Result<Vec<u8>> {
        let socket = UdpSocket::bind(("0.0.0.0", local_port))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send_to(&msg, (dst, port))?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = socket
            .recv_from(&mut buf)
            .context("waiting for the UDP reply")?;
        Ok(buf[..n].to_vec())
    })?
}

/// Sends `size` deterministic bytes to a `HashSink` and checks the hash it returns.
pub fn bulk_upload(ns: &str, dst: &str, port: u16, size: usize) -> Result<()> {
    let mut stream = tcp_connect(ns, dst, port, None)?;
    let mut hash = FNV_START;
    let chunk: Vec<u8> = (0..65536).map(payload_byte).collect();
    let mut sent = 0;
    while sent < size {
        let n = chunk.len().min(size - sent);
        stream.write_all(&chunk[..n])?;
        hash = fnv1a(hash, &chunk[..n]);
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut got = [0u8; 8];
    stream
        .read_exact(&mut got)
        .context("reading the server's hash")?;
    anyhow::ensure!(
        u64::from_be_bytes(got) == hash,
        "upload of {size} bytes arrived corrupted"
    );
    Ok(())
}

/// Downloads from a `Source(size)` server and checks every byte.
pub fn bulk_download(ns: &str, dst: &str, port: u16, size: usize) -> Result<()> {
    let mut stream = tcp_connect(ns, dst, port, None)?;
    let mut data = Vec::with_capacity(size);
    stream.read_to_end(&mut data)?;
    anyhow::ensure!(
        data.len() == size,
        "downloaded {} of {size} bytes",
        data.len()
    );
    anyhow::ensure!(
        data.iter().enumerate().all(|(i, b)| *b == payload_byte(i)),
        "download arrived corrupted"
    );
    Ok(())
}

/// Runs `f` in namespace `ns` on a background thread.
pub fn background<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    spawn_within(ns, f)
}

/// TCP echo exchanges and UDP request/responses in a loop from a pod, on one connection and
/// one UDP socket, until stopped: traffic that must survive daemon restarts.
pub struct LiveLoad {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<u32>>,
}

impl LiveLoad {
    /// Starts the loop in namespace `ns` over `stream`, with UDP from `udp_local_port` to the
    /// echo server at `udp_dst`, pausing `pause` between rounds.
    pub fn start(
        ns: &str,
        mut stream: TcpStream,
        udp_dst: (Ipv4Addr, u16),
        udp_local_port: u16,
        pause: Duration,
    ) -> Result<Self> {
        let socket = within(ns, move || UdpSocket::bind(("0.0.0.0", udp_local_port)))??;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> Result<u32> {
            let mut buf = [0u8; 16];
            let mut rounds = 0u32;
            while !stop2.load(Ordering::Relaxed) {
                echo_roundtrip(&mut stream, b"live").context("TCP exchange")?;
                socket.send_to(b"u", udp_dst)?;
                let (n, _) = socket.recv_from(&mut buf).context("UDP reply")?;
                anyhow::ensure!(&buf[..n] == b"u", "UDP reply differs");
                rounds += 1;
                std::thread::sleep(pause);
            }
            Ok(rounds)
        });
        Ok(Self { stop, thread })
    }

    /// Stops the loop; the number of complete rounds, or the first exchange that failed.
    pub fn finish(self) -> Result<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    }
}
