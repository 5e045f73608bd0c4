//! One client connection. Each round reads what the client sent (a pipeline is many commands
//! at once), routes every whole command to its shard, queues one batch per shard, waits for
//! the replies and writes them back in the order the commands came: pipelining is kept, and a
//! depth of 16 costs one read and one write here, not sixteen.

use super::commands::{self, Kind};
use super::ketama::{self, Ring};
use super::resp::{self, ProtocolError};
use super::shard::{Batch, Pool, Replies};
use bytes::{Buf, Bytes, BytesMut};
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Most commands routed in one round (the rest wait for the next): bounds what a round holds.
const ROUND_COMMANDS: usize = 4096;
/// Most payload bytes queued in one round.
const ROUND_BYTES: usize = 4 * 1024 * 1024;

/// What a session needs from the ambassador's settings.
pub struct SessionSettings {
    pub hash: ketama::Hash,
    pub hash_tag: Option<(u8, u8)>,
    pub password: Option<String>,
    pub max_command_bytes: usize,
}

/// Where a command's reply comes from.
enum Slot {
    /// Written by the ambassador: `local[range]`.
    Local(Range<usize>),
    /// The `index`-th reply of the batch sent to `shard`.
    Routed { shard: usize, index: usize },
    /// A command split over shards, its replies merged.
    Split(Box<SplitPlan>),
}

enum Merge {
    /// `MGET`: one array, the elements in the keys' order.
    Array,
    /// `DEL`, `EXISTS`…: the sum of the integers.
    Sum,
    /// `MSET`: `+OK` when every part is.
    Ok,
}

struct SplitPlan {
    merge: Merge,
    /// (shard, index in its batch) of each part.
    parts: Vec<(usize, usize)>,
    /// For [`Merge::Array`]: for each key in order, (part, element of that part's array).
    order: Vec<(usize, usize)>,
}

/// One round's routing: the slots in order, and per shard the payload queued for it.
struct Round {
    slots: Vec<Slot>,
    local: Vec<u8>,
    payloads: Vec<Vec<u8>>,
    counts: Vec<usize>,
    bytes: usize,
    quit: bool,
}

impl Round {
    fn new(shards: usize) -> Round {
        Round { slots: Vec::new(), local: Vec::new(), payloads: vec![Vec::new(); shards], counts: vec![0; shards], bytes: 0, quit: false }
    }

    fn local(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.local.len();
        write(&mut self.local);
        self.slots.push(Slot::Local(start..self.local.len()));
    }

    fn error(&mut self, message: &str) {
        self.local(|out| resp::write_error(out, message));
    }

    /// Queues a command (its bytes as they came, or written again as an array) for `shard`;
    /// returns its index in that shard's batch.
    fn queue(&mut self, shard: usize, write: impl FnOnce(&mut Vec<u8>)) -> usize {
        let payload = &mut self.payloads[shard];
        let before = payload.len();
        write(payload);
        self.bytes += payload.len() - before;
        self.counts[shard] += 1;
        self.counts[shard] - 1
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Serves one client until it leaves, sends QUIT or breaks the protocol.
pub async fn serve(mut stream: TcpStream, pool: Arc<Pool>, settings: Arc<SessionSettings>, lane: usize) {
    let _ = stream.set_nodelay(true);
    let mut session = Session { pool, settings, lane, authed: false, name: None, args: Vec::new() };
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut round = Round::new(session.pool.shards.len());
    loop {
        match stream.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let consumed = match session.route(&input, &mut round) {
                Ok(consumed) => consumed,
                Err(e) => {
                    // What was whole before the bad bytes is answered; then the error, and the
                    // connection closes (as Redis does).
                    session.finish(&mut round, &mut out).await;
                    resp::write_error(&mut out, &e.to_string());
                    let _ = stream.write_all(&out).await;
                    return;
                }
            };
            input.advance(consumed);
            if round.is_empty() {
                break;
            }
            session.finish(&mut round, &mut out).await;
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if round.quit {
                return;
            }
            // A round stops at its limits with whole commands left in the input: go on.
            if consumed == 0 || input.is_empty() {
                break;
            }
        }
        if input.capacity() - input.len() < 4096 {
            input.reserve(16 * 1024);
        }
    }
}

struct Session {
    pool: Arc<Pool>,
    settings: Arc<SessionSettings>,
    lane: usize,
    authed: bool,
    name: Option<Vec<u8>>,
    args: Vec<Range<usize>>,
}

impl Session {
    /// Routes the whole commands at the start of `input` into `round`; returns the bytes used.
    fn route(&mut self, input: &[u8], round: &mut Round) -> Result<usize, ProtocolError> {
        let ring = self.pool.ring();
        let mut used = 0;
        while round.slots.len() < ROUND_COMMANDS && round.bytes < ROUND_BYTES && !round.quit {
            let rest = &input[used..];
            let mut args = std::mem::take(&mut self.args);
            let parsed = resp::parse_request(rest, &mut args, self.settings.max_command_bytes);
            let request = match parsed {
                Ok(Some(request)) => request,
                Ok(None) => {
                    self.args = args;
                    break;
                }
                Err(e) => {
                    self.args = args;
                    return if round.is_empty() { Err(e) } else { Ok(used) };
                }
            };
            if !args.is_empty() {
                self.plan(&rest[..request.len], request.inline, &args, &ring, round);
            }
            self.args = args;
            used += request.len;
        }
        Ok(used)
    }

    /// Decides where one command goes.
    fn plan(&mut self, raw: &[u8], inline: bool, args: &[Range<usize>], ring: &Ring, round: &mut Round) {
        let arg = |i: usize| &raw[args[i].clone()];
        let mut upper = [0u8; 24];
        let name = commands::upper(arg(0), &mut upper);
        let kind = commands::kind(name);
        // The name as errors show it, made only for an error (not per routed command).
        let shown = || String::from_utf8_lossy(arg(0)).to_lowercase();
        if self.settings.password.is_some() && !self.authed && !matches!(name, b"AUTH" | b"QUIT") {
            return round.error("NOAUTH Authentication required.");
        }
        let forward = |out: &mut Vec<u8>| {
            if inline {
                resp::write_command(out, args.iter().map(|r| &raw[r.clone()]));
            } else {
                out.extend_from_slice(raw);
            }
        };
        let shard_of = |key: &[u8]| ring.shard(self.settings.hash.of(ketama::hashed_part(key, self.settings.hash_tag)));
        let no_shard = "pixmesh ambassador: no shard is available (every shard is ejected)";
        match kind {
            Kind::Single => {
                if args.len() < 2 {
                    return round.error(&format!("wrong number of arguments for '{}' command", shown()));
                }
                let Some(shard) = shard_of(arg(1)) else { return round.error(no_shard) };
                let index = round.queue(shard, forward);
                round.slots.push(Slot::Routed { shard, index });
            }
            Kind::SplitArray | Kind::SplitSum | Kind::SplitPairs => {
                let step = if kind == Kind::SplitPairs { 2 } else { 1 };
                if args.len() < 2 || !(args.len() - 1).is_multiple_of(step) {
                    return round.error(&format!("wrong number of arguments for '{}' command", shown()));
                }
                let mut shards = Vec::with_capacity((args.len() - 1) / step);
                for i in (1..args.len()).step_by(step) {
                    let Some(shard) = shard_of(arg(i)) else { return round.error(no_shard) };
                    shards.push(shard);
                }
                if shards.iter().all(|&s| s == shards[0]) {
                    // All on one shard: sent as it came.
                    let shard = shards[0];
                    let index = round.queue(shard, forward);
                    return round.slots.push(Slot::Routed { shard, index });
                }
                self.split(kind, raw, args, &shards, round);
            }
            Kind::Together(keys) => {
                let count_at = |i: usize| args.get(i).and_then(|r| std::str::from_utf8(&raw[r.clone()]).ok()?.parse().ok());
                let keys = match commands::together_keys(keys, args.len(), count_at) {
                    Ok(keys) => keys,
                    Err(why) => return round.error(&format!("pixmesh ambassador: cannot route '{}': {why}", shown())),
                };
                let mut target = None;
                for &k in &keys {
                    let Some(shard) = shard_of(arg(k)) else { return round.error(no_shard) };
                    if target.is_some_and(|t| t != shard) {
                        let hint = match self.settings.hash_tag {
                            Some((open, close)) => format!(
                                "give them one hash tag, like {}user1{}:a and {}user1{}:b",
                                open as char, close as char, open as char, close as char
                            ),
                            None => "set ambassador.redis.hash_tag and give them one hash tag".to_string(),
                        };
                        return round.error(&format!("pixmesh ambassador: the keys of '{}' are on different shards; {hint}", shown()));
                    }
                    target = Some(shard);
                }
                let Some(shard) = target else { return round.error(no_shard) };
                let index = round.queue(shard, forward);
                round.slots.push(Slot::Routed { shard, index });
            }
            Kind::Local => self.local(name, raw, args, round),
            Kind::Refused(why) => round.error(&format!("pixmesh ambassador: '{}' is not supported: {why}", shown())),
            Kind::Unknown => round.error(&format!("unknown command '{}'", shown())),
        }
    }

    /// Splits a multi-key command into one command per shard.
    fn split(&self, kind: Kind, raw: &[u8], args: &[Range<usize>], shards: &[usize], round: &mut Round) {
        let step = if kind == Kind::SplitPairs { 2 } else { 1 };
        let mut distinct: Vec<usize> = shards.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let mut parts = Vec::with_capacity(distinct.len());
        let mut order = vec![(0, 0); if kind == Kind::SplitArray { shards.len() } else { 0 }];
        for (part, &shard) in distinct.iter().enumerate() {
            let mine: Vec<usize> = (0..shards.len()).filter(|&k| shards[k] == shard).collect();
            let name = &raw[args[0].clone()];
            let index = round.queue(shard, |out| {
                resp::write_header(out, b'*', 1 + mine.len() * step);
                resp::write_bulk(out, name);
                for &k in &mine {
                    for j in 0..step {
                        resp::write_bulk(out, &raw[args[1 + k * step + j].clone()]);
                    }
                }
            });
            parts.push((shard, index));
            if kind == Kind::SplitArray {
                for (element, &k) in mine.iter().enumerate() {
                    order[k] = (part, element);
                }
            }
        }
        let merge = match kind {
            Kind::SplitArray => Merge::Array,
            Kind::SplitSum => Merge::Sum,
            _ => Merge::Ok,
        };
        round.slots.push(Slot::Split(Box::new(SplitPlan { merge, parts, order })));
    }

    /// The commands the ambassador answers itself.
    fn local(&mut self, name: &[u8], raw: &[u8], args: &[Range<usize>], round: &mut Round) {
        let arg = |i: usize| &raw[args[i].clone()];
        let shown = || String::from_utf8_lossy(arg(0)).to_lowercase();
        let arity = |round: &mut Round| round.error(&format!("wrong number of arguments for '{}' command", shown()));
        match name {
            b"PING" => match args.len() {
                1 => round.local(|out| out.extend_from_slice(b"+PONG\r\n")),
                2 => round.local(|out| resp::write_bulk(out, arg(1))),
                _ => arity(round),
            },
            b"ECHO" if args.len() == 2 => round.local(|out| resp::write_bulk(out, arg(1))),
            b"QUIT" => {
                round.local(|out| out.extend_from_slice(b"+OK\r\n"));
                round.quit = true;
            }
            b"SELECT" if args.len() == 2 => {
                if arg(1) == b"0" {
                    round.local(|out| out.extend_from_slice(b"+OK\r\n"));
                } else {
                    round.error("pixmesh ambassador: only database 0 is served");
                }
            }
            b"AUTH" if args.len() == 2 || args.len() == 3 => {
                let given = arg(args.len() - 1);
                let user_ok = args.len() == 2 || arg(1) == b"default";
                match &self.settings.password {
                    None => round.error(
                        "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                    ),
                    Some(password) if user_ok && bool::from(subtle::ConstantTimeEq::ct_eq(password.as_bytes(), given)) => {
                        self.authed = true;
                        round.local(|out| out.extend_from_slice(b"+OK\r\n"));
                    }
                    Some(_) => round.error("WRONGPASS invalid username-password pair or user is disabled."),
                }
            }
            b"CLIENT" if args.len() >= 2 => {
                let mut upper = [0u8; 24];
                match commands::upper(arg(1), &mut upper) {
                    b"SETNAME" if args.len() == 3 => {
                        self.name = Some(arg(2).to_vec());
                        round.local(|out| out.extend_from_slice(b"+OK\r\n"));
                    }
                    b"GETNAME" => match &self.name {
                        Some(name) => round.local(|out| resp::write_bulk(out, name)),
                        None => round.local(|out| out.extend_from_slice(b"$-1\r\n")),
                    },
                    b"SETINFO" => round.local(|out| out.extend_from_slice(b"+OK\r\n")),
                    _ => round.error(&format!(
                        "pixmesh ambassador: 'client {}' is not supported",
                        String::from_utf8_lossy(arg(1)).to_lowercase()
                    )),
                }
            }
            _ => arity(round),
        }
    }

    /// Sends the round's batches, waits for their replies and writes every reply in order into
    /// `out`; the round is empty again after.
    async fn finish(&self, round: &mut Round, out: &mut Vec<u8>) {
        let mut waiting: Vec<(usize, oneshot::Receiver<Replies>)> = Vec::new();
        for shard in 0..round.counts.len() {
            let count = std::mem::take(&mut round.counts[shard]);
            if count == 0 {
                continue;
            }
            let payload = std::mem::take(&mut round.payloads[shard]);
            let (tx, rx) = oneshot::channel();
            self.pool.send(shard, self.lane, Batch { payload, count, reply: tx }).await;
            waiting.push((shard, rx));
        }
        let mut replies: Vec<Option<Replies>> = vec![None; round.counts.len()];
        for (shard, rx) in waiting {
            let got = rx.await.unwrap_or_else(|_| Err(self.pool.shards[shard].error("the connection was dropped")));
            replies[shard] = Some(got);
        }
        let reply = |shard: usize, index: usize| -> Result<&Bytes, String> {
            match &replies[shard] {
                Some(Ok(list)) => list.get(index).ok_or_else(|| "a reply is missing".to_string()),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("no batch was sent".to_string()),
            }
        };
        for slot in round.slots.drain(..) {
            match slot {
                Slot::Local(range) => out.extend_from_slice(&round.local[range]),
                Slot::Routed { shard, index } => match reply(shard, index) {
                    Ok(bytes) => out.extend_from_slice(bytes),
                    Err(e) => resp::write_error(out, &e),
                },
                Slot::Split(plan) => merge(&plan, &reply, out),
            }
        }
        round.local.clear();
        round.bytes = 0;
        for payload in &mut round.payloads {
            // The payload went with its batch; start the next one small.
            if payload.capacity() == 0 {
                payload.reserve(1024);
            }
        }
    }
}

/// Writes the merged reply of a split command: the first error among its parts, or the merge.
fn merge<'r>(plan: &SplitPlan, reply: &dyn Fn(usize, usize) -> Result<&'r Bytes, String>, out: &mut Vec<u8>) {
    let mut parts = Vec::with_capacity(plan.parts.len());
    for &(shard, index) in &plan.parts {
        match reply(shard, index) {
            Ok(bytes) if bytes.first() == Some(&b'-') => return out.extend_from_slice(bytes),
            Ok(bytes) => parts.push(bytes),
            Err(e) => return resp::write_error(out, &e),
        }
    }
    match plan.merge {
        Merge::Sum => {
            let mut sum = 0i64;
            for part in &parts {
                match resp::integer_reply(part) {
                    Some(n) => sum += n,
                    None => return resp::write_error(out, "pixmesh ambassador: a shard's reply is not an integer"),
                }
            }
            resp::write_integer(out, sum);
        }
        Merge::Ok => out.extend_from_slice(b"+OK\r\n"),
        Merge::Array => {
            let mut elements = Vec::with_capacity(parts.len());
            for part in &parts {
                match resp::array_elements(part) {
                    Some(ranges) => elements.push(ranges),
                    None => return resp::write_error(out, "pixmesh ambassador: a shard's reply is not an array"),
                }
            }
            resp::write_header(out, b'*', plan.order.len());
            for &(part, element) in &plan.order {
                match elements[part].get(element) {
                    Some(range) => out.extend_from_slice(&parts[part][range.clone()]),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
            }
        }
    }
}
