//! What the ambassador does with each command: route it by its key, split it across shards,
//! answer it itself, or refuse it with a reason (it has no key, or it holds a connection's
//! state that a shared shard connection cannot keep).

/// How a command is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One key, at argument 1 (`GET key`, `HSET key f v`, …).
    Single,
    /// Keys at 1.. (`MGET`): split per shard, the arrays merged back in order.
    SplitArray,
    /// Keys at 1.. (`DEL`, `UNLINK`, `EXISTS`, `TOUCH`): split per shard, the integers summed.
    SplitSum,
    /// Key-value pairs at 1.. (`MSET`): split per shard, `+OK` when every part is OK.
    SplitPairs,
    /// Several keys that must live on one shard (a hash tag puts them there), where they are.
    Together(Keys),
    /// Answered by the ambassador itself.
    Local,
    /// Refused: the reason is in the reply.
    Refused(&'static str),
    /// Not a command the ambassador knows.
    Unknown,
}

/// Where the keys of a [`Kind::Together`] command are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Arguments `first..` to the end, every `step`-th (`step` 2 for `MSETNX`'s pairs).
    From { first: usize, step: usize },
    /// Arguments 1 and 2 (`RENAME src dst`).
    Two,
    /// A count at argument `at`, then that many keys; `plus_first` adds argument 1 (the
    /// destination of `ZUNIONSTORE dst n k…`).
    Counted { at: usize, plus_first: bool },
}

const NO_KEY: &str = "it has no key to route by";
const STATEFUL: &str = "it needs a connection of its own to a Redis server";

/// The kind of a command, from its name in upper case.
pub fn kind(name: &[u8]) -> Kind {
    use Kind::*;
    match name {
        b"GET" | b"SET" | b"SETNX" | b"SETEX" | b"PSETEX" | b"APPEND" | b"STRLEN" | b"INCR" | b"DECR" | b"INCRBY" | b"DECRBY"
        | b"INCRBYFLOAT" | b"GETSET" | b"GETDEL" | b"GETEX" | b"GETRANGE" | b"SETRANGE" | b"SUBSTR" | b"GETBIT" | b"SETBIT"
        | b"BITCOUNT" | b"BITPOS" | b"BITFIELD" | b"BITFIELD_RO" => Single,
        b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" | b"EXPIRETIME" | b"PEXPIRETIME" | b"TTL" | b"PTTL" | b"PERSIST" | b"TYPE"
        | b"DUMP" | b"RESTORE" | b"SORT" | b"SORT_RO" => Single,
        b"HSET" | b"HSETNX" | b"HGET" | b"HMSET" | b"HMGET" | b"HDEL" | b"HLEN" | b"HEXISTS" | b"HGETALL" | b"HKEYS" | b"HVALS"
        | b"HINCRBY" | b"HINCRBYFLOAT" | b"HSTRLEN" | b"HSCAN" | b"HRANDFIELD" => Single,
        b"LPUSH" | b"RPUSH" | b"LPUSHX" | b"RPUSHX" | b"LPOP" | b"RPOP" | b"LLEN" | b"LRANGE" | b"LINDEX" | b"LSET" | b"LREM"
        | b"LTRIM" | b"LINSERT" | b"LPOS" => Single,
        b"SADD" | b"SREM" | b"SCARD" | b"SISMEMBER" | b"SMISMEMBER" | b"SMEMBERS" | b"SPOP" | b"SRANDMEMBER" | b"SSCAN" => Single,
        b"ZADD" | b"ZREM" | b"ZCARD" | b"ZSCORE" | b"ZMSCORE" | b"ZINCRBY" | b"ZRANK" | b"ZREVRANK" | b"ZRANGE" | b"ZREVRANGE"
        | b"ZRANGEBYSCORE" | b"ZREVRANGEBYSCORE" | b"ZRANGEBYLEX" | b"ZREVRANGEBYLEX" | b"ZCOUNT" | b"ZLEXCOUNT" | b"ZREMRANGEBYRANK"
        | b"ZREMRANGEBYSCORE" | b"ZREMRANGEBYLEX" | b"ZSCAN" | b"ZPOPMIN" | b"ZPOPMAX" | b"ZRANDMEMBER" => Single,
        b"PFADD" | b"GEOADD" | b"GEODIST" | b"GEOHASH" | b"GEOPOS" | b"GEORADIUS_RO" | b"GEORADIUSBYMEMBER_RO" | b"GEOSEARCH" => Single,
        b"XADD" | b"XLEN" | b"XRANGE" | b"XREVRANGE" | b"XDEL" | b"XTRIM" | b"XACK" | b"XPENDING" | b"XCLAIM" | b"XAUTOCLAIM"
        | b"XSETID" => Single,
        b"MGET" => SplitArray,
        b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" => SplitSum,
        b"MSET" => SplitPairs,
        b"MSETNX" => Together(Keys::From { first: 1, step: 2 }),
        b"SINTER" | b"SUNION" | b"SDIFF" | b"SINTERSTORE" | b"SUNIONSTORE" | b"SDIFFSTORE" | b"PFCOUNT" | b"PFMERGE" => {
            Together(Keys::From { first: 1, step: 1 })
        }
        b"BITOP" => Together(Keys::From { first: 2, step: 1 }),
        b"RENAME" | b"RENAMENX" | b"LCS" | b"RPOPLPUSH" | b"LMOVE" | b"SMOVE" | b"COPY" | b"GEOSEARCHSTORE" | b"ZRANGESTORE" => {
            Together(Keys::Two)
        }
        b"ZUNIONSTORE" | b"ZINTERSTORE" | b"ZDIFFSTORE" => Together(Keys::Counted { at: 2, plus_first: true }),
        b"ZUNION" | b"ZINTER" | b"ZDIFF" | b"ZINTERCARD" | b"SINTERCARD" | b"LMPOP" | b"ZMPOP" => {
            Together(Keys::Counted { at: 1, plus_first: false })
        }
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => Together(Keys::Counted { at: 2, plus_first: false }),
        b"PING" | b"ECHO" | b"QUIT" | b"SELECT" | b"AUTH" | b"CLIENT" => Local,
        b"MULTI" | b"EXEC" | b"DISCARD" | b"WATCH" | b"UNWATCH" | b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE"
        | b"PUNSUBSCRIBE" | b"MONITOR" | b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"XREAD" | b"XREADGROUP" | b"WAIT" | b"RESET" => Refused(STATEFUL),
        b"KEYS" | b"SCAN" | b"RANDOMKEY" | b"DBSIZE" | b"FLUSHDB" | b"FLUSHALL" | b"INFO" | b"CONFIG" | b"SAVE" | b"BGSAVE"
        | b"BGREWRITEAOF" | b"LASTSAVE" | b"SHUTDOWN" | b"SLAVEOF" | b"REPLICAOF" | b"DEBUG" | b"OBJECT" | b"MEMORY" | b"SCRIPT"
        | b"FUNCTION" | b"PUBLISH" | b"SPUBLISH" | b"PUBSUB" | b"COMMAND" | b"TIME" | b"ROLE" | b"SLOWLOG" | b"LATENCY" | b"SWAPDB"
        | b"MOVE" | b"MIGRATE" | b"CLUSTER" | b"READONLY" | b"READWRITE" | b"ACL" | b"LOLWUT" => Refused(NO_KEY),
        // HELLO is answered as unknown, as by Redis 5: RESP3 clients then stay on RESP2.
        _ => Unknown,
    }
}

/// The name of a command in upper case, in `out` (names are short; a longer one is no command
/// the ambassador knows).
pub fn upper<'o>(name: &[u8], out: &'o mut [u8; 24]) -> &'o [u8] {
    let n = name.len().min(out.len());
    for (o, b) in out.iter_mut().zip(&name[..n]) {
        *o = b.to_ascii_uppercase();
    }
    if name.len() > out.len() { &[] } else { &out[..n] }
}

/// The indexes of the keys of a [`Kind::Together`] command with `argc` arguments (the name
/// counted), or why they cannot be found.
pub fn together_keys(keys: Keys, argc: usize, count_at: impl Fn(usize) -> Option<usize>) -> Result<Vec<usize>, &'static str> {
    let out: Vec<usize> = match keys {
        Keys::From { first, step } => (first..argc).step_by(step).collect(),
        Keys::Two => (1..argc.min(3)).collect(),
        Keys::Counted { at, plus_first } => {
            let n = count_at(at).ok_or("the number of keys is not a number")?;
            if at + 1 + n > argc {
                return Err("the number of keys is more than the keys given");
            }
            let mut out: Vec<usize> = (at + 1..at + 1 + n).collect();
            if plus_first {
                out.insert(0, 1);
            }
            out
        }
    };
    if out.is_empty() {
        return Err(NO_KEY);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_classified_by_name_in_any_case() {
        let mut buf = [0u8; 24];
        assert_eq!(kind(upper(b"get", &mut buf)), Kind::Single);
        assert_eq!(kind(upper(b"mGeT", &mut buf)), Kind::SplitArray);
        assert_eq!(kind(upper(b"del", &mut buf)), Kind::SplitSum);
        assert_eq!(kind(upper(b"mset", &mut buf)), Kind::SplitPairs);
        assert_eq!(kind(upper(b"keys", &mut buf)), Kind::Refused(NO_KEY));
        assert_eq!(kind(upper(b"multi", &mut buf)), Kind::Refused(STATEFUL));
        assert_eq!(kind(upper(b"hello", &mut buf)), Kind::Unknown);
        assert_eq!(kind(upper(&[b'x'; 40], &mut buf)), Kind::Unknown, "a name longer than any command");
    }

    #[test]
    fn keys_of_multi_key_commands_are_found() {
        let none = |_| None;
        assert_eq!(together_keys(Keys::From { first: 1, step: 2 }, 5, none), Ok(vec![1, 3]));
        assert_eq!(together_keys(Keys::Two, 3, none), Ok(vec![1, 2]));
        assert_eq!(together_keys(Keys::Counted { at: 2, plus_first: true }, 6, |_| Some(3)), Ok(vec![1, 3, 4, 5]));
        assert_eq!(
            together_keys(Keys::Counted { at: 2, plus_first: false }, 4, |_| Some(2)),
            Err("the number of keys is more than the keys given")
        );
        assert_eq!(together_keys(Keys::Counted { at: 2, plus_first: false }, 3, |_| Some(0)), Err(NO_KEY), "EVAL with no key");
        assert_eq!(together_keys(Keys::Counted { at: 1, plus_first: false }, 3, |_| None), Err("the number of keys is not a number"));
    }
}
