//! Finding the other ranks: torchrun-style environment and a TCP rendezvous.
//!
//! Every rank knows `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`
//! ([`DistEnv`]). Rank 0 listens on the master address; the others connect (retrying until
//! rank 0 is up, so the ranks may start in any order) and say who they are; once all
//! `WORLD_SIZE - 1` have joined, rank 0 hands each of them the same payload (for NCCL, the
//! 128-byte unique id of the communicator). A rank that never joins makes rank 0 fail, and
//! rank 0 tells every rank that did join, within the timeout.
//!
//! ```
//! use moco::dist::rendezvous::{rendezvous, DistEnv};
//! use std::time::Duration;
//! // A world of one needs nobody else: the payload comes straight back.
//! let env = DistEnv::single();
//! let got = rendezvous(&env, || Ok(b"id".to_vec()), Duration::from_secs(1)).unwrap();
//! assert_eq!(got, b"id");
//! // A bad environment is refused with a clear error.
//! let bad = DistEnv::from_vars(|k| match k {
//!     "RANK" => Some("3".into()),
//!     "WORLD_SIZE" => Some("2".into()),
//!     _ => None,
//! });
//! assert!(bad.unwrap_err().to_string().contains("RANK"));
//! ```
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::check_rank;
use crate::error::{Error, Result};

/// The largest payload rank 0 may hand out (an NCCL id is 128 bytes).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The most ranks a rendezvous accepts.
pub const MAX_WORLD: usize = 65536;
const MAGIC: &[u8; 8] = b"MOCORDV1";

/// Where this rank stands in a distributed run (torchrun's environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this rank, in `0..world`.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of ranks.
    pub world: usize,
    /// `LOCAL_RANK`: this rank's GPU on its machine (defaults to `rank`).
    pub local_rank: usize,
    /// `MASTER_ADDR`: where rank 0 listens (default `127.0.0.1`).
    pub master_addr: String,
    /// `MASTER_PORT`: the port rank 0 listens on (default 29500, as torchrun).
    pub master_port: u16,
}

impl DistEnv {
    /// A world of one rank.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
        }
    }

    /// Reads the process environment; `None` when `WORLD_SIZE` is not set.
    pub fn from_env() -> Result<Option<DistEnv>> {
        if std::env::var_os("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        DistEnv::from_vars(|k| std::env::var(k).ok()).map(Some)
    }

    /// Reads the variables through `get` (for tests and launchers). `WORLD_SIZE` and
    /// `RANK` are required; every value is checked.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let num = |key: &str, max: usize| -> Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n <= max => Ok(Some(n)),
                    _ => Err(Error::invalid(format!(
                        "{key}={v:?} is not a whole number in 0..={max}"
                    ))),
                },
            }
        };
        let world =
            num("WORLD_SIZE", MAX_WORLD)?.ok_or_else(|| Error::invalid("WORLD_SIZE is not set"))?;
        let rank = num("RANK", MAX_WORLD)?.ok_or_else(|| Error::invalid("RANK is not set"))?;
        if world == 0 || rank >= world {
            return Err(Error::invalid(format!(
                "RANK={rank} is not in a world of WORLD_SIZE={world} (need 0 <= RANK < WORLD_SIZE)"
            )));
        }
        let local_rank = num("LOCAL_RANK", MAX_WORLD)?.unwrap_or(rank);
        let master_port = match num("MASTER_PORT", u16::MAX as usize)? {
            None => 29500,
            Some(0) => return Err(Error::invalid("MASTER_PORT=0 is not a port to meet on")),
            Some(p) => p as u16,
        };
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if master_addr.trim().is_empty() || master_addr.len() > 255 {
            return Err(Error::invalid(format!(
                "MASTER_ADDR={master_addr:?} is not a host name or address"
            )));
        }
        Ok(DistEnv {
            rank,
            world,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
        })
    }

    fn addr(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                Error::Comm(format!(
                    "MASTER_ADDR {}:{} does not resolve: {e}",
                    self.master_addr, self.master_port
                ))
            })?
            .next()
            .ok_or_else(|| Error::Comm(format!("MASTER_ADDR {} has no address", self.master_addr)))
    }
}

/// Meets the other ranks of `env`. Rank 0 calls `payload` once every rank has joined and
/// hands its bytes to all of them; every rank returns the same bytes. Fails with
/// [`Error::Comm`] when the others are not all there within `timeout`.
pub fn rendezvous(
    env: &DistEnv,
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    check_rank(env.rank, env.world)?;
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        serve(env, payload, deadline, timeout)
    } else {
        join(env, deadline, timeout)
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Comm(format!("rendezvous: {what}: {e}"))
}

fn serve(
    env: &DistEnv,
    payload: impl FnOnce() -> Result<Vec<u8>>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>> {
    if env.world == 1 {
        return payload();
    }
    let addr = env.addr()?;
    let listener = TcpListener::bind(addr)
        .map_err(|e| io_err(&format!("rank 0 cannot listen on {addr}"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err("set_nonblocking", e))?;
    let mut joined: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
    let mut count = 1;
    while count < env.world {
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..env.world)
                .filter(|&r| joined[r].is_none())
                .map(|r| r.to_string())
                .collect();
            let why = format!(
                "rank(s) {} did not join rank 0 at {addr} within {:.1} s",
                missing.join(", "),
                timeout.as_secs_f64()
            );
            for s in joined.iter_mut().flatten() {
                let _ = send_reply(s, 1, why.as_bytes());
            }
            return Err(Error::Comm(why));
        }
        match listener.accept() {
            Ok((mut s, peer)) => match read_hello(&mut s, env.world) {
                Ok(r) if joined[r].is_none() => {
                    joined[r] = Some(s);
                    count += 1;
                }
                Ok(r) => {
                    let msg = format!("rank {r} joined twice (from {peer})");
                    let _ = send_reply(&mut s, 1, msg.as_bytes());
                }
                Err(e) => {
                    // A stray or mismatched client: tell it why, keep waiting for the ranks.
                    let _ = send_reply(&mut s, 1, e.to_string().as_bytes());
                    eprintln!("moco rendezvous: ignored a connection from {peer}: {e}");
                }
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("accept", e)),
        }
    }
    let bytes = match payload() {
        Ok(b) if b.len() <= MAX_PAYLOAD => b,
        Ok(b) => {
            let why = format!("payload of {} bytes exceeds {MAX_PAYLOAD}", b.len());
            for s in joined.iter_mut().flatten() {
                let _ = send_reply(s, 1, why.as_bytes());
            }
            return Err(Error::Comm(why));
        }
        Err(e) => {
            for s in joined.iter_mut().flatten() {
                let _ = send_reply(s, 1, e.to_string().as_bytes());
            }
            return Err(e);
        }
    };
    for (r, s) in joined.iter_mut().enumerate() {
        if let Some(s) = s {
            send_reply(s, 0, &bytes).map_err(|e| io_err(&format!("sending to rank {r}"), e))?;
        }
    }
    Ok(bytes)
}

/// Reads a joining rank's hello (magic, world, rank) within a few seconds.
fn read_hello(s: &mut TcpStream, world: usize) -> Result<usize> {
    s.set_nonblocking(false)
        .map_err(|e| io_err("set_blocking", e))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| io_err("set_read_timeout", e))?;
    let mut b = [0u8; 24];
    s.read_exact(&mut b)
        .map_err(|e| io_err("reading a hello", e))?;
    if &b[..8] != MAGIC {
        return Err(Error::Comm("not a moco rendezvous hello".into()));
    }
    let their_world = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) as usize;
    let rank = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")) as usize;
    if their_world != world {
        return Err(Error::Comm(format!(
            "a rank says WORLD_SIZE={their_world}, rank 0 has {world}"
        )));
    }
    if rank == 0 || rank >= world {
        return Err(Error::Comm(format!(
            "a rank says RANK={rank}, not in 1..{world}"
        )));
    }
    Ok(rank)
}

fn send_reply(s: &mut TcpStream, status: u8, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(9 + body.len());
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u64).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg)?;
    s.flush()
}

fn join(env: &DistEnv, deadline: Instant, timeout: Duration) -> Result<Vec<u8>> {
    let addr = env.addr()?;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(Error::Comm(format!(
                        "rank {} could not reach rank 0 at {addr} within {:.1} s: {e}",
                        env.rank,
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut hello = Vec::with_capacity(24);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(env.world as u64).to_le_bytes());
    hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
    s.write_all(&hello)
        .map_err(|e| io_err("sending the hello", e))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left))
        .map_err(|e| io_err("set_read_timeout", e))?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(|e| {
        Error::Comm(format!(
            "rank {} joined rank 0 at {addr} but got no answer within {:.1} s: {e}",
            env.rank,
            timeout.as_secs_f64()
        ))
    })?;
    let len = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD as u64 {
        return Err(Error::Comm(format!(
            "rank 0 announced {len} bytes, more than {MAX_PAYLOAD}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)
        .map_err(|e| io_err("reading rank 0's answer", e))?;
    if head[0] != 0 {
        return Err(Error::Comm(format!(
            "rank 0 ended the rendezvous: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(body)
}
