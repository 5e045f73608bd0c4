//! The entropy layer: a bit reader over an entropy-coded segment (byte stuffing, restart
//! markers, truncation) and canonical Huffman tables with a one-lookup fast path.

/// Codes of up to this many bits are decoded with one table lookup.
const LOOKUP_BITS: u32 = 10;
const LOOKUP_SIZE: usize = 1 << LOOKUP_BITS;

/// A Huffman table from a DHT segment.
pub(super) struct HuffmanTable {
    /// Indexed by the next `LOOKUP_BITS` bits: `length << 8 | symbol` for codes that fit, 0 otherwise.
    lookup: Box<[u16; LOOKUP_SIZE]>,
    /// For AC tables, indexed the same way: a whole coefficient (code and its extra bits) that
    /// fits in `LOOKUP_BITS`, packed as `value << 16 | run << 8 | total_length`; 0 otherwise.
    fast_ac: Box<[i32; LOOKUP_SIZE]>,
    /// Largest code of each length (index 1..=16), -1 when there is none.
    max_code: [i32; 17],
    /// Added to a code of a given length to index `symbols`.
    offset: [i32; 17],
    symbols: Vec<u8>,
}

impl HuffmanTable {
    /// `counts[i]` codes of length `i + 1`, assigned to `symbols` in order (ITU T.81 Annex C).
    pub(super) fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<HuffmanTable, String> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total != symbols.len() || total > 256 {
            return Err(format!("Huffman table has {total} codes for {} symbols", symbols.len()));
        }
        let mut lookup = Box::new([0u16; LOOKUP_SIZE]);
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut code: u32 = 0;
        let mut index = 0usize;
        for len in 1..=16u32 {
            let count = usize::from(counts[len as usize - 1]);
            offset[len as usize] = index as i32 - code as i32;
            for _ in 0..count {
                if code >= 1 << len {
                    return Err("Huffman table has more codes than its lengths allow".into());
                }
                if len <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - len;
                    let first = (code << shift) as usize;
                    let entry = (len as u16) << 8 | u16::from(symbols[index]);
                    lookup[first..first + (1 << shift)].fill(entry);
                }
                code += 1;
                index += 1;
            }
            if count > 0 {
                max_code[len as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        let mut fast_ac = Box::new([0i32; LOOKUP_SIZE]);
        for (bits, slot) in fast_ac.iter_mut().enumerate() {
            let entry = lookup[bits];
            if entry == 0 {
                continue;
            }
            let (len, symbol) = (u32::from(entry >> 8), entry & 0xff);
            let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
            if size == 0 || len + size > LOOKUP_BITS {
                continue;
            }
            let raw = ((bits as u32) >> (LOOKUP_BITS - len - size)) & ((1 << size) - 1);
            let value = extend(raw, size);
            *slot = value << 16 | (run << 8 | (len + size)) as i32;
        }
        Ok(HuffmanTable { lookup, fast_ac, max_code, offset, symbols: symbols.to_vec() })
    }
}

/// The sign extension of T.81 F.2.2.1: `size` raw bits as a signed coefficient.
#[inline(always)]
pub(super) fn extend(raw: u32, size: u32) -> i32 {
    if size == 0 {
        return 0;
    }
    let raw = raw as i32;
    if raw < 1 << (size - 1) { raw - (1 << size) + 1 } else { raw }
}

/// Reads bits MSB-first from an entropy-coded segment. Past a marker or the end of the data it
/// reads zeros, as libjpeg does, so a truncated file still decodes what it holds.
pub(super) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Valid bits are the top `count` bits; the rest are zero.
    buf: u64,
    count: u32,
    /// The marker that ended the segment (its 0xFF is at `pos`), if one was reached.
    marker: Option<u8>,
    /// Zero bytes fed past the end of the segment (kept for tests and debugging).
    #[cfg_attr(not(test), allow(dead_code))]
    padding: usize,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(data: &'a [u8], pos: usize) -> BitReader<'a> {
        BitReader { data, pos, buf: 0, count: 0, marker: None, padding: 0 }
    }

    /// Where the segment's next unread byte is (a marker, once one was reached).
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Makes at least 32 bits available: every read below takes at most 32 (a Huffman code and
    /// its extra bits take at most 16 each, and each refills first). Refilling only below 32
    /// adds 4 to 8 bytes at a time.
    #[inline(always)]
    fn refill(&mut self) {
        if self.count >= 32 {
            return;
        }
        // Fast path: the next 8 bytes hold no 0xFF, so no stuffing and no marker.
        if self.marker.is_none()
            && let Some(chunk) = self.data.get(self.pos..self.pos + 8)
        {
            let word = u64::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
            let inverted = !word;
            let has_ff = inverted.wrapping_sub(0x0101_0101_0101_0101) & !inverted & 0x8080_8080_8080_8080 != 0;
            if !has_ff {
                let bytes = (64 - self.count) / 8;
                let keep = !(u64::MAX.checked_shr(8 * bytes).unwrap_or(0));
                self.buf |= (word & keep) >> self.count;
                self.count += 8 * bytes;
                self.pos += bytes as usize;
                return;
            }
        }
        self.refill_slow();
    }

    #[cold]
    fn refill_slow(&mut self) {
        while self.count <= 56 {
            let byte = if self.marker.is_some() {
                self.padding += 1;
                0
            } else {
                match self.data.get(self.pos) {
                    None => {
                        self.padding += 1;
                        0
                    }
                    Some(0xff) => {
                        // Fill bytes (0xFF 0xFF …) may precede a marker.
                        let mut next = self.pos + 1;
                        while self.data.get(next) == Some(&0xff) {
                            next += 1;
                        }
                        match self.data.get(next) {
                            Some(0x00) => {
                                self.pos = next + 1;
                                0xff
                            }
                            Some(&m) => {
                                self.pos = next - 1;
                                self.marker = Some(m);
                                self.padding += 1;
                                0
                            }
                            None => {
                                self.pos = self.data.len();
                                self.padding += 1;
                                0
                            }
                        }
                    }
                    Some(&b) => {
                        self.pos += 1;
                        b
                    }
                }
            };
            self.buf |= u64::from(byte) << (56 - self.count);
            self.count += 8;
        }
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.count -= n;
    }

    /// The next `n` (1..=16) bits as an unsigned number.
    #[inline(always)]
    pub(super) fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        self.refill();
        let v = (self.buf >> (64 - n)) as u32;
        self.consume(n);
        v
    }

    #[inline(always)]
    pub(super) fn bit(&mut self) -> bool {
        self.refill();
        let v = self.buf >> 63 != 0;
        self.consume(1);
        v
    }

    /// Drops the next `n` bits (any number).
    #[inline(always)]
    pub(super) fn skip(&mut self, mut n: u32) {
        while n > 0 {
            self.refill();
            let step = n.min(32);
            self.consume(step);
            n -= step;
        }
    }

    /// The `size`-bit signed coefficient that follows a Huffman symbol.
    #[inline(always)]
    pub(super) fn receive_extend(&mut self, size: u32) -> i32 {
        extend(self.bits(size), size)
    }

    /// One Huffman symbol.
    #[inline(always)]
    pub(super) fn decode(&mut self, table: &HuffmanTable) -> Result<u8, String> {
        self.refill();
        let entry = table.lookup[(self.buf >> (64 - LOOKUP_BITS)) as usize];
        if entry != 0 {
            self.consume(u32::from(entry >> 8));
            return Ok(entry as u8);
        }
        self.decode_slow(table)
    }

    #[cold]
    fn decode_slow(&mut self, table: &HuffmanTable) -> Result<u8, String> {
        for len in LOOKUP_BITS + 1..=16 {
            let code = (self.buf >> (64 - len)) as i32;
            if code <= table.max_code[len as usize] {
                self.consume(len);
                let index = (code + table.offset[len as usize]) as usize;
                return table.symbols.get(index).copied().ok_or_else(|| "bad Huffman code".to_string());
            }
        }
        Err("bad Huffman code".into())
    }

    /// One AC coefficient: `(run, value)`, where value 0 means EOB (run < 15) or ZRL (run 15).
    #[inline(always)]
    pub(super) fn decode_ac(&mut self, table: &HuffmanTable) -> Result<(u32, i32), String> {
        self.refill();
        let fast = table.fast_ac[(self.buf >> (64 - LOOKUP_BITS)) as usize];
        if fast != 0 {
            self.consume((fast & 0xff) as u32);
            return Ok(((fast >> 8 & 0xff) as u32, fast >> 16));
        }
        let symbol = self.decode(table)?;
        let (run, size) = (u32::from(symbol >> 4), u32::from(symbol & 15));
        Ok((run, self.receive_extend(size)))
    }

    /// At a restart interval: drops the bits left in the current byte and steps over the RSTn
    /// marker, skipping garbage before it. `false` when another marker (or the end) came first.
    pub(super) fn restart(&mut self) -> bool {
        self.buf = 0;
        self.count = 0;
        if let Some(m) = self.marker.take() {
            if (0xd0..=0xd7).contains(&m) {
                self.pos += 2;
                return true;
            }
            self.marker = Some(m);
            return false;
        }
        // Look for the next marker, skipping stray bytes as libjpeg's resync does.
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xff && self.data[p + 1] != 0x00 && self.data[p + 1] != 0xff {
                let m = self.data[p + 1];
                self.pos = p;
                if (0xd0..=0xd7).contains(&m) {
                    self.pos = p + 2;
                    return true;
                }
                self.marker = Some(m);
                return false;
            }
            p += 1;
        }
        self.pos = self.data.len();
        self.marker = Some(0xd9);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_codes_short_and_long_with_stuffing() {
        // Lengths: one code of 2 bits (00 → 'a'), one of 3 (010 → 'b'), and one of 12 bits
        // (011000000000 → 'c', past the lookup table).
        let mut counts = [0u8; 16];
        counts[1] = 1;
        counts[2] = 1;
        counts[11] = 1;
        let table = HuffmanTable::new(&counts, b"abc").unwrap();
        // bits: 00 010 011000000000 then 1 bits; 0xFF is stuffed as FF 00.
        // 0001 0011 | 0000 0000 | 0111 1111 | 1111 1111 (FF 00)
        let data = [0b0001_0011, 0b0000_0000, 0b0111_1111, 0xff, 0x00];
        let mut r = BitReader::new(&data, 0);
        assert_eq!(r.decode(&table).unwrap(), b'a');
        assert_eq!(r.decode(&table).unwrap(), b'b');
        assert_eq!(r.decode(&table).unwrap(), b'c');
        assert_eq!(r.bits(11), 0b111_1111_1111);
        assert_eq!(r.bits(4), 0b1111);
        // Past the end: zeros, counted.
        assert_eq!(r.bits(16), 0);
        assert!(r.padding > 0);
    }

    #[test]
    fn overfull_tables_and_marker_ends_are_handled() {
        let mut counts = [0u8; 16];
        counts[0] = 3; // three 1-bit codes cannot exist
        assert!(HuffmanTable::new(&counts, b"abc").is_err());
        let data = [0xaa, 0xff, 0xd0, 0x55, 0xff, 0xd9];
        let mut r = BitReader::new(&data, 0);
        assert_eq!(r.bits(8), 0xaa);
        assert_eq!(r.bits(8), 0, "a marker reads as zeros");
        assert!(r.restart(), "RST0 is stepped over");
        assert_eq!(r.bits(8), 0x55);
        assert!(!r.restart(), "EOI is not a restart marker");
        assert_eq!(r.position(), 4);
    }

    #[test]
    fn sign_extension() {
        assert_eq!(extend(0, 1), -1);
        assert_eq!(extend(1, 1), 1);
        assert_eq!(extend(0b010, 3), -5);
        assert_eq!(extend(0b110, 3), 6);
        assert_eq!(extend(0, 0), 0);
    }
}
