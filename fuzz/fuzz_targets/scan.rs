//! Fuzzes the opcode scanner: any input gives a report or an error, never a panic, and feeding it
//! in the pieces the streaming scanner asks for gives the same answer as one whole scan.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picklegate_core::scan::{scan, Need, Progress, Scanner};

fuzz_target!(|data: &[u8]| {
    let whole = scan(data);
    if let Ok(report) = &whole {
        assert!(report.end <= data.len() && report.end + report.trailing == data.len());
    }
    let mut scanner = Scanner::default();
    let mut seen = 0usize;
    let streamed = loop {
        match scanner.feed(&data[..seen]) {
            Ok(Progress::Done(report)) => break Ok(report),
            Ok(Progress::NeedMore(need)) => {
                if seen == data.len() {
                    break Err(scanner.truncation(&data[..seen]));
                }
                let more = match need {
                    Need::Bytes(n) => n,
                    Need::Line => data[seen..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(data.len() - seen, |i| i + 1),
                };
                assert!(more >= 1, "the scanner asked for nothing");
                seen = seen.saturating_add(more).min(data.len());
            }
            Err(error) => break Err(error),
        }
    };
    match (&whole, &streamed) {
        (Ok(a), Ok(b)) => assert_eq!(
            (&a.globals, &a.unresolved, a.end),
            (&b.globals, &b.unresolved, b.end)
        ),
        (Err(_), Err(_)) => {}
        _ => panic!("whole scan {whole:?} and streamed scan {streamed:?} disagree"),
    }
});
