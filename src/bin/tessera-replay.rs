//! tessera-replay: replays an allocation trace (docs/trace-format.md, plain
//! or .gz) on the sim backend and prints one JSON line. A stable interface:
//! it is how policies are compared on a CPU.
//!
//!   tessera-replay TRACE [--conf STRING] [--frontier] [--capacity BYTES] [--timeline N] [--map]

use tessera::config::{Bytes, Config, OptionValue};
use std::io::Write;
use tessera::replay;

const USAGE: &str = "usage: tessera-replay TRACE [--conf STRING] [--frontier] [--capacity BYTES] [--timeline N] [--map]
  TRACE           a trace file, plain or gzip ('a|f ADDR SIZE STREAM' lines)
  --conf STRING   tessera configuration (TESSERA_CONF syntax); default: TESSERA_CONF
  --frontier      also find the least capacity (to 2 MiB) with which the trace completes
  --capacity B    replay under a fixed device capacity (bytes, or 40G) and report the first OOM
  --timeline N    before the report, one JSON line every N events: live, reserved, cached and
                  largest cached bytes, mapped bytes per arena (fragmentation over time)
  --map           before the report, the block map where the replay stopped (at the OOM with
                  --capacity): one line per segment, its blocks as STATE:SIZE@STREAM";

fn main() {
    let mut out = std::io::stdout().lock();
    match run(std::env::args().skip(1).collect(), &mut out) {
        Ok(Done::Report(line)) => print_or_quit(&mut out, &line),
        Ok(Done::Help) => print_or_quit(&mut out, USAGE),
        Err(e) => {
            eprintln!("tessera-replay: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// What a run printed last.
enum Done {
    Report(String),
    Help,
}

/// Prints a line; a reader that went away (`| head`) ends the program
/// quietly.
fn print_or_quit(out: &mut impl Write, line: &str) {
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

fn run(args: Vec<String>, out: &mut impl Write) -> Result<Done, String> {
    let (mut trace, mut conf, mut frontier, mut capacity, mut timeline, mut map) = (None, None, false, None, 0usize, false);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--conf" => conf = Some(it.next().ok_or("--conf needs a value")?),
            "--frontier" => frontier = true,
            "--map" => map = true,
            "--timeline" => {
                let v = it.next().ok_or("--timeline needs a value")?;
                timeline = v.parse().map_err(|_| format!("bad --timeline '{v}'"))?;
            }
            "--capacity" => {
                let v = it.next().ok_or("--capacity needs a value")?;
                capacity = Some(Bytes::parse(&v).ok_or(format!("bad --capacity '{v}'"))?.0);
            }
            "-h" | "--help" => return Ok(Done::Help),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ if trace.is_none() => trace = Some(a),
            _ => return Err(format!("unexpected argument {a}")),
        }
    }
    let trace = trace.ok_or("no trace given")?;
    let config = match conf {
        Some(text) => Config::parse(&text),
        None => Config::from_env(),
    }
    .map_err(|e| e.to_string())?;
    let events = tessera::trace::read_file(std::path::Path::new(&trace))?;
    let result = replay::replay_with_timeline(&events, &config, capacity, timeline, &mut |s| print_or_quit(out, &s.to_json()))?;
    let block_map = replay::block_map(&result, config.page_size.0);
    if map && !block_map.is_empty() {
        print_or_quit(out, block_map.trim_end_matches('\n'));
    }
    let frontier_bytes = if frontier {
        Some(replay::frontier(&events, &config, 2 << 20)?.0)
    } else {
        None
    };
    Ok(Done::Report(replay::report_json(&result, frontier_bytes, capacity)))
}
