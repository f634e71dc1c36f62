//! An HTTP fault proxy for testing against an S3-compatible server: it
//! forwards each request to the upstream and, by a seeded coin, instead
//! answers `503 SlowDown`, stalls before forwarding, or forwards and then
//! drops the connection without an answer (the request landed; the
//! client never hears so). Used by the guest suite (scripts/vm): the
//! whole device suite runs through it. `--delay-ms` holds every request
//! that long before forwarding it: a distant store's round trip, for the
//! guest benchmarks (scripts/bench-vm.sh).
//!
//! ```sh
//! fault_proxy --listen 127.0.0.1:9001 --upstream 127.0.0.1:9000 \
//!   --fail 0.10 --stall 0.02 --stall-max-ms 8000 --drop 0.02 --seed 1
//! ```
//!
//! Every fault is one line on stderr (`fault: 503 PUT /vols/…`), so a
//! test can count them. Std only: requests are read with their
//! `Content-Length` body (S3 clients send one), and each is forwarded on a
//! fresh upstream connection with `Connection: close`, its answer relayed
//! until the upstream closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Config {
    listen: String,
    upstream: String,
    fail: f64,
    stall: f64,
    stall_max_ms: u64,
    drop: f64,
    seed: u64,
    delay_ms: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: fault_proxy --listen ADDR --upstream ADDR [--fail P] [--stall P] \
         [--stall-max-ms MS] [--drop P] [--seed N] [--delay-ms MS]"
    );
    std::process::exit(2)
}

fn parse() -> Config {
    let mut c = Config {
        listen: String::new(),
        upstream: String::new(),
        fail: 0.0,
        stall: 0.0,
        stall_max_ms: 5000,
        drop: 0.0,
        seed: 1,
        delay_ms: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        let num = || value.parse::<f64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--listen" => c.listen = value.clone(),
            "--upstream" => c.upstream = value.clone(),
            "--fail" => c.fail = num(),
            "--stall" => c.stall = num(),
            "--stall-max-ms" => c.stall_max_ms = num() as u64,
            "--drop" => c.drop = num(),
            "--seed" => c.seed = num() as u64,
            "--delay-ms" => c.delay_ms = num() as u64,
            _ => usage(),
        }
    }
    if c.listen.is_empty() || c.upstream.is_empty() {
        usage()
    }
    c
}

/// One seeded sequence for the whole proxy (requests draw in arrival order).
struct Coin(Mutex<u64>);

impl Coin {
    fn next(&self) -> u64 {
        let mut s = self.0.lock().unwrap();
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Fate {
    Forward,
    Fail,
    Stall(u64),
    Drop,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Read one request: its head (up to the blank line) and its body.
fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut len = 0usize;
    for line in head.lines() {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("transfer-encoding") && v.trim() != "identity" {
                return Err(std::io::Error::other(
                    "chunked request bodies are not supported",
                ));
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// The head with `Connection: close` (the upstream then ends its answer
/// by closing, which is how the proxy knows it is complete).
fn closing(head: &str) -> String {
    let mut out = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if line
            .split_once(':')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// Send the request upstream and read its answer. The body is written
/// while the answer is read: a server may answer before it has read the
/// whole body (s3s-fs answers a conditional create of an existing key
/// with 412 at once, and closes), and that answer is what the client must
/// get — not a dropped connection because the rest of the body could not
/// be sent.
fn forward(upstream: &str, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(closing(head).as_bytes())?;
    let mut sender = up.try_clone()?;
    let mut answer = Vec::new();
    let read = std::thread::scope(|s| {
        s.spawn(move || {
            // An error here is the server having answered early.
            let _ = sender.write_all(body);
        });
        up.read_to_end(&mut answer)
    });
    if answer.is_empty() {
        read?;
    }
    Ok(answer)
}

fn slow_down() -> Vec<u8> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                <Message>injected by fault_proxy</Message></Error>";
    format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(client: TcpStream, cfg: &Config, coin: &Coin) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    while let Some((head, body)) = read_request(&mut reader)? {
        let n = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        let what = head.lines().next().unwrap_or("").to_string();
        let x = coin.unit();
        let fate = if x < cfg.fail {
            Fate::Fail
        } else if x < cfg.fail + cfg.stall {
            Fate::Stall(1 + coin.next() % cfg.stall_max_ms.max(1))
        } else if x < cfg.fail + cfg.stall + cfg.drop {
            Fate::Drop
        } else {
            Fate::Forward
        };
        match fate {
            Fate::Fail => {
                eprintln!("fault: 503 #{n} {what}");
                client.write_all(&slow_down())?;
                continue;
            }
            Fate::Stall(ms) => {
                eprintln!("fault: stall {ms} ms #{n} {what}");
                std::thread::sleep(Duration::from_millis(ms));
            }
            Fate::Drop => {
                let landed = forward(&cfg.upstream, &head, &body).is_ok();
                eprintln!("fault: drop after forwarding (landed: {landed}) #{n} {what}");
                return Ok(());
            }
            Fate::Forward => {}
        }
        if cfg.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(cfg.delay_ms));
        }
        let answer = forward(&cfg.upstream, &head, &body)?;
        client.write_all(&answer)?;
        // The upstream said `Connection: close`; so does its answer, and the
        // client will not send more on this connection.
        return Ok(());
    }
    Ok(())
}

fn main() {
    let cfg: &'static Config = Box::leak(Box::new(parse()));
    let coin: &'static Coin = Box::leak(Box::new(Coin(Mutex::new(cfg.seed))));
    let listener = TcpListener::bind(&cfg.listen).unwrap_or_else(|e| {
        eprintln!("fault_proxy: cannot listen on {}: {e}", cfg.listen);
        std::process::exit(1)
    });
    eprintln!(
        "fault_proxy: {} -> {} (fail {}, stall {} up to {} ms, drop {}, seed {}, delay {} ms)",
        cfg.listen,
        cfg.upstream,
        cfg.fail,
        cfg.stall,
        cfg.stall_max_ms,
        cfg.drop,
        cfg.seed,
        cfg.delay_ms
    );
    for client in listener.incoming().flatten() {
        std::thread::spawn(move || {
            if let Err(e) = serve(client, cfg, coin) {
                eprintln!("fault_proxy: connection ended: {e}");
            }
        });
    }
}
