//! Allocation traces in the format of docs/trace-format.md: one event a line,
//! `a ADDR SIZE STREAM` or `f ADDR SIZE STREAM`, `#` starts a comment.
//! Plain text or gzip (by magic bytes). The same format is what tessera's
//! history ring dumps (`from_history`), so a trace recorded on a GPU
//! replays on the sim.
#![forbid(unsafe_code)]

use crate::error::quoted;
use std::io::{BufRead, BufReader, Read};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Alloc,
    Free,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub action: Action,
    pub addr: u64,
    pub size: u64,
    pub stream: u64,
}

/// The longest line a trace may have (a line of four numbers takes under
/// 100 bytes; the rest is room for comments). Longer ones are an error,
/// read no further than this: a hostile file cannot make a line take memory.
pub const MAX_LINE_BYTES: usize = 4096;

/// Parses a whole trace. Errors name the line.
pub fn parse(reader: impl Read) -> Result<Vec<Event>, String> {
    let mut events = Vec::new();
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    for i in 0.. {
        raw.clear();
        let read = (&mut reader).take(MAX_LINE_BYTES as u64 + 1).read_until(b'\n', &mut raw);
        let n = read.map_err(|e| format!("line {}: {e}", i + 1))?;
        if n == 0 {
            break;
        }
        if raw.len() > MAX_LINE_BYTES {
            return Err(format!("line {}: longer than {MAX_LINE_BYTES} bytes", i + 1));
        }
        let line = std::str::from_utf8(&raw).map_err(|_| format!("line {}: not text (UTF-8)", i + 1))?;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("line {}: expected 'a|f ADDR SIZE STREAM', got {}", i + 1, quoted(line));
        if fields.len() != 4 {
            return Err(bad());
        }
        let action = match fields[0] {
            "a" => Action::Alloc,
            "f" => Action::Free,
            _ => return Err(bad()),
        };
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        events.push(Event { action, addr: num(fields[1])?, size: num(fields[2])?, stream: num(fields[3])? });
    }
    Ok(events)
}

/// Reads a trace file, plain or gzip.
pub fn read_file(path: &std::path::Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        parse(flate2::read::GzDecoder::new(&bytes[..]))
    } else {
        parse(&bytes[..])
    }
}

/// Writes events in the trace format.
pub fn write(events: &[Event], out: &mut impl std::io::Write) -> std::io::Result<()> {
    for e in events {
        let a = if e.action == Action::Alloc { 'a' } else { 'f' };
        writeln!(out, "{a} {} {} {}", e.addr, e.size, e.stream)?;
    }
    Ok(())
}

/// The alloc and free events of a device's history ring as a trace, with
/// a comment line naming the device (replayable with tessera-replay).
pub fn from_history(device: i32, history: &[crate::pool::HistoryEvent]) -> String {
    use crate::pool::HistoryAction as H;
    let events: Vec<Event> = history
        .iter()
        .filter_map(|e| {
            let action = match e.action {
                H::Alloc => Action::Alloc,
                H::Free => Action::Free,
                _ => return None,
            };
            Some(Event { action, addr: e.addr, size: e.size, stream: e.stream })
        })
        .collect();
    let mut out = format!("# action addr size stream (tessera history, device {device})\n").into_bytes();
    write(&events, &mut out).expect("writing to memory");
    String::from_utf8(out).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_write_round_trip() {
        let text = "# header\na 100 512 0\n\nf 100 512 0 # done\n";
        let ev = parse(text.as_bytes()).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1], Event { action: Action::Free, addr: 100, size: 512, stream: 0 });
        let mut out = Vec::new();
        write(&ev, &mut out).unwrap();
        assert_eq!(parse(&out[..]).unwrap(), ev);
        assert!(parse("x 1 2 3".as_bytes()).unwrap_err().contains("line 1"));
        assert!(parse("a 1 2".as_bytes()).is_err());
        // A hostile line: refused after MAX_LINE_BYTES, never echoed whole.
        let long = format!("a {}\n", "9".repeat(10 * MAX_LINE_BYTES));
        let e = parse(long.as_bytes()).unwrap_err();
        assert!(e.contains("longer than") && e.len() < 100, "{e}");
        let wide = format!("a 1 2 {}\n", "x".repeat(1000));
        let e = parse(wide.as_bytes()).unwrap_err();
        assert!(e.contains("1006 bytes") && e.len() < 200, "{e}");
    }
}
