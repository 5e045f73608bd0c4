//! pixmesh's JPEG decoder: baseline and progressive Huffman JPEG, 8-bit, 1 to 4 components,
//! decoded straight to 1/1, 1/2, 1/4 or 1/8 scale.
//!
//! Why our own: shrink-on-load is where an image server's speed comes from, and no maintained
//! pure-Rust decoder does it well. `zune-jpeg` has no reduced-size decoding; `jpeg-decoder`
//! reduces only in the IDCT, keeps all 64 coefficients of every block of a progressive image,
//! and its progressive refinement walks coefficients one by one (it spent 70% of a 18 MP
//! thumbnail there). Here:
//! - only the K×K coefficients a reduced IDCT needs are stored (1/4 of them at 1/2 scale), so a
//!   progressive image's coefficient buffer shrinks with the scale;
//! - progressive refinement finds the already non-zero coefficients from a 64-bit mask per block
//!   and reads their correction bits together;
//! - a sequential (baseline) image is decoded one MCU row at a time straight into output rows:
//!   no whole-image coefficient buffer at all.
//!
//! Not supported (typed `UnsupportedFormat`, as in most decoders): arithmetic coding, lossless
//! and hierarchical JPEG, 12-bit samples, DNL-defined heights. The caller falls back to a
//! general decoder for those.

mod blocks;
mod color;
mod huffman;
mod idct;

use crate::error::ImagingError;
use crate::sniff::Format;
use blocks::{Band, Keep, ZIGZAG};
use color::Transform;
use huffman::{BitReader, HuffmanTable};
use idct::Idct;

/// What the markers before the first scan say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub width: u32,
    pub height: u32,
    pub progressive: bool,
    pub components: usize,
    /// The EXIF block (TIFF header onwards), if any.
    pub exif: Option<Vec<u8>>,
    /// The ICC profile reassembled from its APP2 chunks, if complete.
    pub icc: Option<Vec<u8>>,
}

/// Decoded pixels: gray (1 channel), RGB (3) or, when asked for, CMYK (4; 0 = no ink), rows packed.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

const TRUNCATED: &str = "truncated marker segment";

fn corrupt(reason: impl Into<String>) -> ImagingError {
    ImagingError::Corrupt { format: Format::Jpeg, reason: reason.into() }
}

fn unsupported(what: &str) -> ImagingError {
    ImagingError::UnsupportedFormat(format!("JPEG: {what}"))
}

/// Reads the markers up to the first scan; touches no entropy-coded data.
pub(crate) fn read_header(bytes: &[u8]) -> Result<Header, ImagingError> {
    let mut d = Decoder::new(bytes, 1, Budget { bytes: u64::MAX, scans: usize::MAX })?;
    d.run(true)?;
    let frame = d.frame.as_ref().ok_or_else(|| corrupt("no frame header before the first scan"))?;
    Ok(Header {
        width: frame.width as u32,
        height: frame.height as u32,
        progressive: frame.progressive,
        components: frame.comps.len(),
        exif: d.exif.clone(),
        icc: d.icc(),
    })
}

/// What a decode may use: bytes of coefficient and pixel buffers (a bigger image is refused with
/// `LimitExceeded` before they are allocated) and scans (each one is a pass over every block, so
/// a file made of thousands of tiny scans is a CPU bomb).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub bytes: u64,
    pub scans: usize,
}

/// Decodes at `1/denominator` scale (1, 2, 4 or 8), within `budget`. With `raw_cmyk`, a CMYK or
/// YCCK image comes out as CMYK for its colour profile to convert; otherwise as RGB by the plain
/// ink formula.
pub(crate) fn decode(bytes: &[u8], denominator: u32, budget: Budget, raw_cmyk: bool) -> Result<Decoded, ImagingError> {
    let k = match denominator {
        1 => 8,
        2 => 4,
        4 => 2,
        8 => 1,
        _ => return Err(ImagingError::BadOptions(format!("JPEG scale 1/{denominator}"))),
    };
    let mut d = Decoder::new(bytes, k, budget)?;
    d.raw_cmyk = raw_cmyk;
    d.run(false)?;
    d.finish()
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks that hold image data, across and down (T.81 A.2.2).
    bw: usize,
    bh: usize,
    /// Blocks in the MCU-padded grid, across and down.
    pbw: usize,
    /// This component's IDCT size across and down: the frame's K, or more for subsampled chroma
    /// so that it comes out at output resolution without upsampling (2K for 4:2:0 chroma at 1/2
    /// scale and below, 2K × K for 4:2:2).
    kw: usize,
    kh: usize,
    keep: Keep,
    /// Dequantisation factors of the kept k×k coefficients, latched at the component's first scan.
    quant: Option<Vec<f32>>,
    pred: i32,
    /// K×K coefficients per block: the whole padded grid, or one MCU row when streaming.
    coefs: Vec<i16>,
    /// Per block: which coefficients are non-zero so far (progressive only).
    nonzero: Vec<u64>,
    /// IDCT output for one MCU row: `pbw·K` wide, `v·K` tall.
    strip: Vec<u8>,
    /// One output row, upsampled.
    row: Vec<u8>,
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
    /// Sequential and every component in the first scan: decoded MCU row by MCU row.
    streaming: bool,
    /// Coefficient storage is allocated (at the first scan).
    allocated: bool,
}

struct Output {
    width: usize,
    height: usize,
    channels: usize,
    transform: Transform,
    raw_cmyk: bool,
    pixels: Vec<u8>,
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    /// Output block size: 8 / the scale denominator.
    k: usize,
    budget: Budget,
    quant: [Option<[u16; 64]>; 4],
    dc: [Option<HuffmanTable>; 4],
    ac: [Option<HuffmanTable>; 4],
    restart_interval: usize,
    frame: Option<Frame>,
    out: Option<Output>,
    exif: Option<Vec<u8>>,
    icc_chunks: Vec<(u8, u8, Vec<u8>)>,
    adobe: Option<u8>,
    jfif: bool,
    scans: usize,
    raw_cmyk: bool,
}

impl<'a> Decoder<'a> {
    fn new(data: &'a [u8], k: usize, budget: Budget) -> Result<Decoder<'a>, ImagingError> {
        if !data.starts_with(&[0xff, 0xd8]) {
            return Err(corrupt("no start-of-image marker"));
        }
        Ok(Decoder {
            data,
            pos: 2,
            k,
            budget,
            quant: [None; 4],
            dc: [None, None, None, None],
            ac: [None, None, None, None],
            restart_interval: 0,
            frame: None,
            out: None,
            exif: None,
            icc_chunks: Vec::new(),
            adobe: None,
            jfif: false,
            scans: 0,
            raw_cmyk: false,
        })
    }

    /// The next marker code at or after `pos`, skipping fill bytes and anything that is not a
    /// marker (stray bytes after a scan, as libjpeg tolerates). `None` at the end of the data.
    fn next_marker(&mut self) -> Option<u8> {
        let mut p = self.pos;
        while p + 1 < self.data.len() {
            if self.data[p] == 0xff {
                let m = self.data[p + 1];
                if m != 0x00 && m != 0xff && !(0xd0..=0xd7).contains(&m) {
                    self.pos = p + 2;
                    return Some(m);
                }
            }
            p += 1;
        }
        self.pos = self.data.len();
        None
    }

    /// The payload of the segment at `pos` (after its marker); moves past it.
    fn segment(&mut self) -> Result<&'a [u8], ImagingError> {
        let data: &'a [u8] = self.data;
        let len = match data.get(self.pos..self.pos + 2) {
            Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
            None => return Err(corrupt(TRUNCATED)),
        };
        if len < 2 {
            return Err(corrupt("marker segment length below 2"));
        }
        let payload = data.get(self.pos + 2..self.pos + len).ok_or_else(|| corrupt(TRUNCATED))?;
        self.pos += len;
        Ok(payload)
    }

    /// The payload of an APPn or COM segment, which decoding does not need. A damaged one is
    /// passed over as libjpeg does (`skip_variable`): a declared length below 2 (a Photoshop
    /// or Adobe segment whose length was zeroed) reads as empty, and whatever bytes follow are
    /// skipped up to the next marker.
    fn optional_segment(&mut self) -> Result<&'a [u8], ImagingError> {
        match self.data.get(self.pos..self.pos + 2) {
            Some(b) if u16::from_be_bytes([b[0], b[1]]) < 2 => {
                self.pos += 2;
                Ok(&[])
            }
            _ => self.segment(),
        }
    }

    fn run(&mut self, header_only: bool) -> Result<(), ImagingError> {
        match self.markers(header_only) {
            // Cut off after some scans: keep what they hold, as libjpeg does.
            Err(ImagingError::Corrupt { reason, .. }) if reason == TRUNCATED && self.scans > 0 => Ok(()),
            other => other,
        }
    }

    fn markers(&mut self, header_only: bool) -> Result<(), ImagingError> {
        while let Some(marker) = self.next_marker() {
            match marker {
                0xd9 => break,
                0xd8 | 0x01 => {}
                0xc0..=0xc2 => {
                    let seg = self.segment()?;
                    if self.frame.is_some() {
                        return Err(corrupt("more than one frame header"));
                    }
                    self.frame = Some(parse_frame(seg, marker == 0xc2)?);
                }
                0xc3 | 0xc5..=0xc7 => return Err(unsupported("lossless or hierarchical coding")),
                0xc9..=0xcb | 0xcd..=0xcf => return Err(unsupported("arithmetic coding")),
                0xc4 => {
                    let seg = self.segment()?;
                    self.huffman_tables(seg)?;
                }
                0xdb => {
                    let seg = self.segment()?;
                    self.quant_tables(seg)?;
                }
                0xdd => {
                    let seg = self.segment()?;
                    let b = seg.get(..2).ok_or_else(|| corrupt("short DRI segment"))?;
                    self.restart_interval = usize::from(u16::from_be_bytes([b[0], b[1]]));
                }
                0xda => {
                    if header_only {
                        return Ok(());
                    }
                    let seg = self.segment()?;
                    self.scan(seg)?;
                }
                0xe0..=0xef => {
                    let seg = self.optional_segment()?;
                    self.app(marker, seg);
                }
                0xfe => {
                    self.optional_segment()?;
                }
                _ => {
                    self.segment()?;
                }
            }
        }
        if header_only {
            return Err(corrupt("no scan in the file"));
        }
        Ok(())
    }

    /// What pixmesh reads from APPn segments; a payload too short or malformed for its kind
    /// is ignored (defaults kept), never an error, as in libjpeg.
    fn app(&mut self, marker: u8, seg: &[u8]) {
        match marker {
            0xe0 if seg.starts_with(b"JFIF\0") => self.jfif = true,
            0xe1 if seg.starts_with(b"Exif\0\0") && self.exif.is_none() => self.exif = Some(seg[6..].to_vec()),
            0xe2 if seg.len() > 14 && seg.starts_with(b"ICC_PROFILE\0") => self.icc_chunks.push((seg[12], seg[13], seg[14..].to_vec())),
            0xee if seg.len() >= 12 && seg.starts_with(b"Adobe") => self.adobe = Some(seg[11]),
            _ => {}
        }
    }

    /// The ICC profile, if all its chunks are there (numbered 1..=n, as ICC.1 B.4 says).
    fn icc(&self) -> Option<Vec<u8>> {
        let count = self.icc_chunks.first()?.1;
        let mut chunks: Vec<&(u8, u8, Vec<u8>)> = self.icc_chunks.iter().collect();
        chunks.sort_by_key(|c| c.0);
        let complete =
            chunks.len() == usize::from(count) && chunks.iter().enumerate().all(|(i, c)| usize::from(c.0) == i + 1 && c.1 == count);
        complete.then(|| chunks.iter().flat_map(|c| c.2.iter().copied()).collect())
    }

    fn quant_tables(&mut self, mut seg: &[u8]) -> Result<(), ImagingError> {
        while let Some((&pq_tq, rest)) = seg.split_first() {
            let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
            if id > 3 || precision > 1 {
                return Err(corrupt(format!("bad quantization table {pq_tq:#x}")));
            }
            let size = if precision == 0 { 64 } else { 128 };
            let values = rest.get(..size).ok_or_else(|| corrupt("short quantization table"))?;
            let mut table = [0u16; 64];
            for (z, q) in table.iter_mut().enumerate() {
                *q = if precision == 0 { u16::from(values[z]) } else { u16::from_be_bytes([values[2 * z], values[2 * z + 1]]) };
            }
            self.quant[id] = Some(table);
            seg = &rest[size..];
        }
        Ok(())
    }

    fn huffman_tables(&mut self, mut seg: &[u8]) -> Result<(), ImagingError> {
        while let Some((&tc_th, rest)) = seg.split_first() {
            let (class, id) = (tc_th >> 4, usize::from(tc_th & 15));
            if class > 1 || id > 3 {
                return Err(corrupt(format!("bad Huffman table {tc_th:#x}")));
            }
            let counts: [u8; 16] = rest.get(..16).and_then(|c| c.try_into().ok()).ok_or_else(|| corrupt("short Huffman table"))?;
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let symbols = rest.get(16..16 + total).ok_or_else(|| corrupt("short Huffman table"))?;
            let table = HuffmanTable::new(&counts, symbols).map_err(corrupt)?;
            if class == 0 {
                self.dc[id] = Some(table);
            } else {
                self.ac[id] = Some(table);
            }
            seg = &rest[16 + total..];
        }
        Ok(())
    }

    /// Allocates coefficient and pixel buffers at the first scan, within the budget.
    fn allocate(&mut self, streaming: bool) -> Result<(), ImagingError> {
        let k = self.k;
        let adobe = self.adobe;
        let jfif = self.jfif;
        let frame = self.frame.as_mut().ok_or_else(|| corrupt("scan before the frame header"))?;
        if frame.allocated {
            return Ok(());
        }
        let ids: Vec<u8> = frame.comps.iter().map(|c| c.id).collect();
        let transform = Transform::pick(&ids, adobe, jfif).ok_or_else(|| unsupported("2-component images"))?;
        let (ow, oh) = ((frame.width * k).div_ceil(8), (frame.height * k).div_ceil(8));
        let channels = transform.channels(self.raw_cmyk);
        let mut bytes = (ow * oh * channels) as u64;
        for c in &mut frame.comps {
            let grow = |ratio: usize| {
                let mut kc = k;
                while kc < 8 && ratio.is_multiple_of(2 * kc / k) {
                    kc *= 2;
                }
                kc
            };
            (c.kw, c.kh) = (grow(frame.hmax / c.h), grow(frame.vmax / c.v));
            c.keep = Keep::new(c.kw, c.kh);
            let rows = if streaming { c.v } else { frame.mcuy * c.v };
            let blocks = (c.pbw * rows) as u64;
            bytes += blocks * (Keep::stride(c.kw, c.kh) * 2) as u64 + if frame.progressive { blocks * 8 } else { 0 };
            bytes += (c.pbw * c.kw * c.v * c.kh + ow) as u64;
        }
        if bytes > self.budget.bytes {
            return Err(ImagingError::LimitExceeded(format!(
                "decoding this {}x{} JPEG needs {} MB; the limit is {} MB",
                frame.width,
                frame.height,
                bytes >> 20,
                self.budget.bytes >> 20
            )));
        }
        for c in &mut frame.comps {
            let rows = if streaming { c.v } else { frame.mcuy * c.v };
            c.coefs = vec![0; c.pbw * rows * Keep::stride(c.kw, c.kh)];
            if frame.progressive {
                c.nonzero = vec![0; c.pbw * rows];
            }
            c.strip = vec![0; c.pbw * c.kw * c.v * c.kh];
            c.row = vec![0; ow];
        }
        frame.streaming = streaming;
        frame.allocated = true;
        self.out =
            Some(Output { width: ow, height: oh, channels, transform, raw_cmyk: self.raw_cmyk, pixels: vec![0; ow * oh * channels] });
        Ok(())
    }

    fn scan(&mut self, seg: &[u8]) -> Result<(), ImagingError> {
        let frame = self.frame.as_ref().ok_or_else(|| corrupt("scan before the frame header"))?;
        let (&ns, rest) = seg.split_first().ok_or_else(|| corrupt("empty scan header"))?;
        let ns = usize::from(ns);
        if ns == 0 || ns > 4 || rest.len() < 2 * ns + 3 {
            return Err(corrupt("bad scan header"));
        }
        let mut members = Vec::with_capacity(ns);
        for i in 0..ns {
            let (id, tables) = (rest[2 * i], rest[2 * i + 1]);
            let index = frame.comps.iter().position(|c| c.id == id).ok_or_else(|| corrupt(format!("scan names unknown component {id}")))?;
            if members.iter().any(|&(m, _, _)| m == index) {
                return Err(corrupt("scan names a component twice"));
            }
            members.push((index, usize::from(tables >> 4), usize::from(tables & 15)));
        }
        let (ss, se, ah, al) =
            (usize::from(rest[2 * ns]), usize::from(rest[2 * ns + 1]), u32::from(rest[2 * ns + 2] >> 4), u32::from(rest[2 * ns + 2] & 15));
        if members.iter().any(|&(_, dc, ac)| dc > 3 || ac > 3) {
            return Err(corrupt("scan names a Huffman table above 3"));
        }
        self.scans += 1;
        if self.scans > self.budget.scans {
            return Err(ImagingError::LimitExceeded(format!("the JPEG has more than {} scans", self.budget.scans)));
        }
        let progressive = frame.progressive;
        if progressive {
            let valid = if ss == 0 { se == 0 } else { se >= ss && se <= 63 && ns == 1 };
            if !valid || al > 13 || ah > 13 {
                return Err(corrupt(format!("bad progressive scan parameters Ss={ss} Se={se} Ah={ah} Al={al}")));
            }
        }
        let streaming = !progressive && ns == frame.comps.len();
        if frame.allocated && frame.streaming {
            // A sequential image decoded as it streamed: a further scan has nothing to add.
            return Ok(());
        }
        self.allocate(streaming)?;
        // Latch quantisation tables for the components in this scan.
        let k = self.k;
        let frame = self.frame.as_mut().ok_or_else(|| corrupt("scan before the frame header"))?;
        for &(index, _, _) in &members {
            let c = &mut frame.comps[index];
            if c.quant.is_none() {
                let table = self.quant[c.tq].ok_or_else(|| corrupt(format!("component {} has no quantization table", c.id)))?;
                let mut natural = [0f32; 64];
                for (z, &q) in table.iter().enumerate() {
                    natural[usize::from(ZIGZAG[z])] = f32::from(q);
                }
                let kw = c.kw;
                c.quant = Some((0..kw * c.kh).map(|i| natural[(i / kw) * 8 + i % kw]).collect());
            }
            c.pred = 0;
        }
        let mut reader = BitReader::new(self.data, self.pos);
        let kind = if !progressive {
            ScanKind::Sequential
        } else if ss == 0 {
            if ah == 0 { ScanKind::DcFirst } else { ScanKind::DcRefine }
        } else if ah == 0 {
            ScanKind::AcFirst
        } else {
            ScanKind::AcRefine
        };
        for &(_, dc, ac) in &members {
            let needs_dc = matches!(kind, ScanKind::Sequential | ScanKind::DcFirst);
            let needs_ac = matches!(kind, ScanKind::Sequential | ScanKind::AcFirst | ScanKind::AcRefine);
            if (needs_dc && self.dc[dc].is_none()) || (needs_ac && self.ac[ac].is_none()) {
                return Err(corrupt("scan uses an undefined Huffman table"));
            }
        }
        let scan = Scan { kind, members, band: Band { ss, se, al }, restart: self.restart_interval };
        let tables = Tables { dc: &self.dc, ac: &self.ac };
        let out = self.out.as_mut().ok_or_else(|| corrupt("no output buffer"))?;
        if streaming {
            decode_streaming(frame, &scan, &tables, &mut reader, k, out)?;
        } else {
            decode_into_storage(frame, &scan, &tables, &mut reader)?;
        }
        self.pos = reader.position();
        Ok(())
    }

    fn finish(mut self) -> Result<Decoded, ImagingError> {
        let k = self.k;
        let frame = self.frame.as_mut().ok_or_else(|| corrupt("no frame header"))?;
        let mut out = self.out.take().ok_or_else(|| corrupt("no scan in the file"))?;
        if !frame.streaming {
            for my in 0..frame.mcuy {
                emit_rows(frame, my, false, k, &mut out);
            }
        }
        Ok(Decoded { width: out.width as u32, height: out.height as u32, channels: out.channels, pixels: out.pixels })
    }
}

fn parse_frame(seg: &[u8], progressive: bool) -> Result<Frame, ImagingError> {
    let b = seg.get(..6).ok_or_else(|| corrupt("short frame header"))?;
    if b[0] != 8 {
        return Err(unsupported(&format!("{}-bit samples", b[0])));
    }
    let height = usize::from(u16::from_be_bytes([b[1], b[2]]));
    let width = usize::from(u16::from_be_bytes([b[3], b[4]]));
    let n = usize::from(b[5]);
    if height == 0 {
        return Err(unsupported("height defined by a DNL marker"));
    }
    if width == 0 {
        return Err(corrupt("image width is 0"));
    }
    if n == 0 || n > 4 {
        return Err(corrupt(format!("{n} components")));
    }
    let specs = seg.get(6..6 + 3 * n).ok_or_else(|| corrupt("short frame header"))?;
    let mut comps = Vec::with_capacity(n);
    for s in specs.chunks_exact(3) {
        let (h, v, tq) = (usize::from(s[1] >> 4), usize::from(s[1] & 15), usize::from(s[2]));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
            return Err(corrupt(format!("bad component parameters {:?}", s)));
        }
        if comps.iter().any(|c: &Component| c.id == s[0]) {
            return Err(corrupt("two components with the same id"));
        }
        // One component: sampling factors mean nothing (T.81 A.2.2), blocks are the MCUs.
        let (h, v) = if n == 1 { (1, 1) } else { (h, v) };
        comps.push(Component {
            id: s[0],
            h,
            v,
            tq,
            bw: 0,
            bh: 0,
            pbw: 0,
            kw: 8,
            kh: 8,
            keep: Keep::new(8, 8),
            quant: None,
            pred: 0,
            coefs: Vec::new(),
            nonzero: Vec::new(),
            strip: Vec::new(),
            row: Vec::new(),
        });
    }
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
        return Err(unsupported("non-integral chroma subsampling"));
    }
    let (mcux, mcuy) = (width.div_ceil(8 * hmax), height.div_ceil(8 * vmax));
    for c in &mut comps {
        c.bw = (width * c.h).div_ceil(hmax).div_ceil(8);
        c.bh = (height * c.v).div_ceil(vmax).div_ceil(8);
        c.pbw = mcux * c.h;
    }
    Ok(Frame { width, height, progressive, comps, hmax, vmax, mcux, mcuy, streaming: false, allocated: false })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanKind {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

struct Scan {
    kind: ScanKind,
    /// (component index, DC table, AC table)
    members: Vec<(usize, usize, usize)>,
    band: Band,
    restart: usize,
}

struct Tables<'t> {
    dc: &'t [Option<HuffmanTable>; 4],
    ac: &'t [Option<HuffmanTable>; 4],
}

/// Decodes one block of component `c` at `index` (in blocks) of its coefficient storage.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_block(
    c: &mut Component,
    index: usize,
    dc: usize,
    ac: usize,
    scan: &Scan,
    tables: &Tables<'_>,
    reader: &mut BitReader<'_>,
    eobrun: &mut u32,
) -> Result<(), String> {
    let kk = Keep::stride(c.kw, c.kh);
    let keep = &c.keep;
    let Some(block) = c.coefs.get_mut(index * kk..index * kk + kk) else {
        return Err("block outside the image".into());
    };
    let missing = || "scan uses an undefined Huffman table".to_string();
    match scan.kind {
        ScanKind::Sequential => {
            let (Some(dct), Some(act)) = (&tables.dc[dc], &tables.ac[ac]) else { return Err(missing()) };
            blocks::sequential(reader, dct, act, &mut c.pred, block, keep)
        }
        ScanKind::DcFirst => {
            let Some(dct) = &tables.dc[dc] else { return Err(missing()) };
            blocks::dc_first(reader, dct, &mut c.pred, block, scan.band.al)
        }
        ScanKind::DcRefine => {
            blocks::dc_refine(reader, block, scan.band.al);
            Ok(())
        }
        ScanKind::AcFirst | ScanKind::AcRefine => {
            let Some(act) = &tables.ac[ac] else { return Err(missing()) };
            let nz = c.nonzero.get_mut(index).ok_or_else(|| "block outside the image".to_string())?;
            if scan.kind == ScanKind::AcFirst {
                blocks::ac_first(reader, act, &scan.band, eobrun, block, nz, keep)
            } else {
                blocks::ac_refine(reader, act, &scan.band, eobrun, block, nz, keep)
            }
        }
    }
}

/// Handles the restart interval between MCUs: true when the scan should go on.
fn restart(frame: &mut Frame, scan: &Scan, reader: &mut BitReader<'_>, done: usize, total: usize, eobrun: &mut u32) -> bool {
    if scan.restart == 0 || done == 0 || !done.is_multiple_of(scan.restart) || done >= total {
        return true;
    }
    for &(index, _, _) in &scan.members {
        frame.comps[index].pred = 0;
    }
    *eobrun = 0;
    // A missing RST marker (corrupt data or the end) leaves zeros to read, as libjpeg does.
    reader.restart();
    true
}

/// A scan into whole-image coefficient storage (progressive, or sequential with one scan per
/// component).
fn decode_into_storage(frame: &mut Frame, scan: &Scan, tables: &Tables<'_>, reader: &mut BitReader<'_>) -> Result<(), ImagingError> {
    let mut eobrun = 0u32;
    if let [(index, dc, ac)] = scan.members[..] {
        // Non-interleaved: the component's own blocks, row by row.
        let (bw, bh, pbw) = (frame.comps[index].bw, frame.comps[index].bh, frame.comps[index].pbw);
        let total = bw * bh;
        for by in 0..bh {
            for bx in 0..bw {
                let done = by * bw + bx;
                restart(frame, scan, reader, done, total, &mut eobrun);
                let c = &mut frame.comps[index];
                decode_block(c, by * pbw + bx, dc, ac, scan, tables, reader, &mut eobrun).map_err(corrupt)?;
            }
        }
    } else {
        let total = frame.mcux * frame.mcuy;
        for my in 0..frame.mcuy {
            for mx in 0..frame.mcux {
                restart(frame, scan, reader, my * frame.mcux + mx, total, &mut eobrun);
                for &(index, dc, ac) in &scan.members {
                    let c = &mut frame.comps[index];
                    for by in 0..c.v {
                        for bx in 0..c.h {
                            let at = (my * c.v + by) * c.pbw + mx * c.h + bx;
                            decode_block(c, at, dc, ac, scan, tables, reader, &mut eobrun).map_err(corrupt)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A sequential scan with every component: each MCU row is decoded into the row buffers and
/// turned into output pixels at once.
fn decode_streaming(
    frame: &mut Frame,
    scan: &Scan,
    tables: &Tables<'_>,
    reader: &mut BitReader<'_>,
    k: usize,
    out: &mut Output,
) -> Result<(), ImagingError> {
    let mut eobrun = 0u32;
    let total = frame.mcux * frame.mcuy;
    for my in 0..frame.mcuy {
        for c in &mut frame.comps {
            c.coefs.fill(0);
        }
        for mx in 0..frame.mcux {
            restart(frame, scan, reader, my * frame.mcux + mx, total, &mut eobrun);
            for &(index, dc, ac) in &scan.members {
                let c = &mut frame.comps[index];
                for by in 0..c.v {
                    for bx in 0..c.h {
                        let at = by * c.pbw + mx * c.h + bx;
                        decode_block(c, at, dc, ac, scan, tables, reader, &mut eobrun).map_err(corrupt)?;
                    }
                }
            }
        }
        emit_rows(frame, my, true, k, out);
    }
    Ok(())
}

/// IDCT of MCU row `my` and its conversion to output rows. `row_buffer`: the coefficients hold
/// only this MCU row.
fn emit_rows(frame: &mut Frame, my: usize, row_buffer: bool, k: usize, out: &mut Output) {
    for c in &mut frame.comps {
        match (c.kw, c.kh) {
            (8, 8) => idct_strip::<8, 8>(c, my, row_buffer),
            (4, 4) => idct_strip::<4, 4>(c, my, row_buffer),
            (2, 2) => idct_strip::<2, 2>(c, my, row_buffer),
            (1, 1) => idct_strip::<1, 1>(c, my, row_buffer),
            // Chroma subsampled one way only (4:2:2, 4:4:0).
            (8, 4) => idct_strip::<8, 4>(c, my, row_buffer),
            (4, 2) => idct_strip::<4, 2>(c, my, row_buffer),
            (2, 1) => idct_strip::<2, 1>(c, my, row_buffer),
            (4, 8) => idct_strip::<4, 8>(c, my, row_buffer),
            (2, 4) => idct_strip::<2, 4>(c, my, row_buffer),
            (1, 2) => idct_strip::<1, 2>(c, my, row_buffer),
            // 4:1:1 and other factors of 4 one way.
            (8, 2) => idct_strip::<8, 2>(c, my, row_buffer),
            (4, 1) => idct_strip::<4, 1>(c, my, row_buffer),
            (2, 8) => idct_strip::<2, 8>(c, my, row_buffer),
            (1, 4) => idct_strip::<1, 4>(c, my, row_buffer),
            (8, 1) => idct_strip::<8, 1>(c, my, row_buffer),
            (1, 8) => idct_strip::<1, 8>(c, my, row_buffer),
            _ => c.strip.fill(128),
        }
    }
    let rows = frame.vmax * k;
    let y0 = my * rows;
    let line = out.width * out.channels;
    for ly in 0..rows.min(out.height.saturating_sub(y0)) {
        for c in &mut frame.comps {
            let stride = c.pbw * c.kw;
            // Output pixels per component sample, down and across.
            let (vs, hs) = ((frame.vmax * k) / (c.v * c.kh), (frame.hmax * k) / (c.h * c.kw));
            let sy = ly / vs.max(1);
            let Some(src) = c.strip.get(sy * stride..sy * stride + stride) else { continue };
            if hs <= 1 {
                let n = c.row.len().min(src.len());
                c.row[..n].copy_from_slice(&src[..n]);
            } else {
                for (d, &s) in c.row.chunks_mut(hs).zip(src) {
                    d.fill(s);
                }
            }
        }
        let mut rows_in: [&[u8]; 4] = [&[]; 4];
        for (slot, c) in rows_in.iter_mut().zip(&frame.comps) {
            *slot = &c.row;
        }
        if let Some(dst) = out.pixels.get_mut((y0 + ly) * line..(y0 + ly) * line + line) {
            color::convert(out.transform, out.raw_cmyk, &rows_in[..frame.comps.len()], dst);
        }
    }
}

/// The IDCT of one MCU row of a component into its strip.
fn idct_strip<const KW: usize, const KH: usize>(c: &mut Component, my: usize, row_buffer: bool) {
    let Some(quant) = &c.quant else {
        // Never in a scan: stays mid-grey, as libjpeg leaves it.
        c.strip.fill(128);
        return;
    };
    let idct = Idct::<KW, KH>::new();
    let kk = Keep::stride(KW, KH);
    let stride = c.pbw * KW;
    let first = if row_buffer { 0 } else { my * c.v * c.pbw };
    // Blocks past the image's data (MCU padding) are not needed.
    let used = c.bw.min(c.pbw);
    for by in 0..c.v {
        for bx in 0..used {
            let b = first + by * c.pbw + bx;
            let (Some(coefs), Some(strip)) = (c.coefs.get(b * kk..b * kk + KW * KH), c.strip.get_mut(by * KH * stride + bx * KW..)) else {
                continue;
            };
            idct.block(coefs, quant, strip, stride);
        }
    }
}

#[cfg(test)]
mod tests;
