//! Counting a PostgreSQL client's messages on the wire, for round trips per
//! checkout.
//!
//! A [`FaultProxy`](crate::FaultProxy) started with
//! [`start_counting_postgres`](crate::FaultProxy::start_counting_postgres)
//! parses the frontend protocol (PostgreSQL's "Message Flow" and "Message
//! Formats" chapters) on the client-to-server direction of every connection:
//! the untyped startup packets first (`SSLRequest`, `GSSENCRequest`,
//! `CancelRequest`, then the `StartupMessage`), then typed messages (one tag
//! byte, a big-endian length that counts itself, the body). A client waits
//! for the server once per simple `Query` (`Q`) and once per extended-protocol
//! `Sync` (`S`), so their sum is the number of round trips it made. Once a
//! connection switches to TLS the bytes are opaque and nothing more is
//! counted on it.

use std::sync::atomic::{AtomicU64, Ordering};

/// `StartupMessage`'s protocol version 3.0.
const PROTOCOL_3: u32 = 196_608;
/// `SSLRequest`.
const SSL_REQUEST: u32 = 80_877_103;
/// `GSSENCRequest`.
const GSSENC_REQUEST: u32 = 80_877_104;
/// `CancelRequest`.
const CANCEL_REQUEST: u32 = 80_877_102;
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Client messages seen so far, across every connection of one proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PgMessages {
    /// Sessions started (`StartupMessage`s): connections opened by the client.
    pub startups: u64,
    /// Simple-protocol queries (`Q`).
    pub queries: u64,
    /// Extended-protocol syncs (`S`).
    pub syncs: u64,
    /// Extended-protocol parses (`P`): statements prepared.
    pub parses: u64,
    /// Cancel requests (on connections of their own).
    pub cancels: u64,
    /// Connections closed with `Terminate` (`X`).
    pub terminates: u64,
}

impl PgMessages {
    /// Round trips: the client waited for the server once per `Query` and once
    /// per `Sync`.
    pub fn round_trips(&self) -> u64 {
        self.queries + self.syncs
    }

    /// What was counted after `earlier` (a snapshot of the same proxy).
    pub fn since(&self, earlier: &PgMessages) -> PgMessages {
        PgMessages {
            startups: self.startups.saturating_sub(earlier.startups),
            queries: self.queries.saturating_sub(earlier.queries),
            syncs: self.syncs.saturating_sub(earlier.syncs),
            parses: self.parses.saturating_sub(earlier.parses),
            cancels: self.cancels.saturating_sub(earlier.cancels),
            terminates: self.terminates.saturating_sub(earlier.terminates),
        }
    }
}

/// The shared tallies behind [`PgMessages`].
#[derive(Debug, Default)]
pub(crate) struct Tally {
    startups: AtomicU64,
    queries: AtomicU64,
    syncs: AtomicU64,
    parses: AtomicU64,
    cancels: AtomicU64,
    terminates: AtomicU64,
}

impl Tally {
    pub(crate) fn snapshot(&self) -> PgMessages {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PgMessages {
            startups: read(&self.startups),
            queries: read(&self.queries),
            syncs: read(&self.syncs),
            parses: read(&self.parses),
            cancels: read(&self.cancels),
            terminates: read(&self.terminates),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Untyped packets: length, then a 32-bit code.
    Startup,
    /// Typed messages: tag byte, then length.
    Typed,
    /// TLS or garbage: not parsed.
    Opaque,
}

/// One connection's frontend parser, fed the client's bytes in whatever
/// chunks they arrive.
#[derive(Debug)]
pub(crate) struct FrontendParser {
    phase: Phase,
    header: [u8; 8],
    have: usize,
    /// Body bytes of the current message still to skip.
    skip: usize,
}

impl FrontendParser {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Startup,
            header: [0; 8],
            have: 0,
            skip: 0,
        }
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], tally: &Tally) {
        while !bytes.is_empty() && self.phase != Phase::Opaque {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.phase == Phase::Startup && self.have == 0 && bytes[0] == TLS_HANDSHAKE {
                self.phase = Phase::Opaque;
                return;
            }
            let need = match self.phase {
                Phase::Startup => 8,
                _ => 5,
            };
            let n = (need - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < need {
                return;
            }
            self.have = 0;
            self.header_done(tally);
        }
    }

    fn header_done(&mut self, tally: &Tally) {
        let h = self.header;
        match self.phase {
            Phase::Startup => {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                if len < 8 {
                    self.phase = Phase::Opaque;
                    return;
                }
                self.skip = len - 8;
                match code {
                    PROTOCOL_3 => {
                        Tally::bump(&tally.startups);
                        self.phase = Phase::Typed;
                    }
                    SSL_REQUEST | GSSENC_REQUEST => {}
                    CANCEL_REQUEST => Tally::bump(&tally.cancels),
                    _ => self.phase = Phase::Opaque,
                }
            }
            Phase::Typed => {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len < 4 {
                    self.phase = Phase::Opaque;
                    return;
                }
                self.skip = len - 4;
                match h[0] {
                    b'Q' => Tally::bump(&tally.queries),
                    b'S' => Tally::bump(&tally.syncs),
                    b'P' => Tally::bump(&tally.parses),
                    b'X' => Tally::bump(&tally.terminates),
                    _ => {}
                }
            }
            Phase::Opaque => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend(code.to_be_bytes());
        out.extend(body);
        out
    }

    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(((4 + body.len()) as u32).to_be_bytes());
        out.extend(body);
        out
    }

    /// An SSL refusal, a startup, a password, a simple query, an extended
    /// query (parse, bind, describe, execute, sync) and a terminate.
    fn session() -> Vec<u8> {
        let mut wire = startup(SSL_REQUEST, b"");
        wire.extend(startup(PROTOCOL_3, b"user\0app\0database\0app\0\0"));
        wire.extend(typed(b'p', b"secret\0"));
        wire.extend(typed(b'Q', b"SELECT 1\0"));
        wire.extend(typed(b'P', b"\0SELECT $1\0\0\0"));
        wire.extend(typed(b'B', &[0; 12]));
        wire.extend(typed(b'D', b"P\0"));
        wire.extend(typed(b'E', &[0, 0, 0, 0, 0]));
        wire.extend(typed(b'S', b""));
        wire.extend(typed(b'Q', b"SELECT 'S', 'Q'\0"));
        wire.extend(typed(b'X', b""));
        wire
    }

    #[test]
    fn counts_queries_and_syncs_however_the_bytes_are_split() {
        let wire = session();
        let want = PgMessages {
            startups: 1,
            queries: 2,
            syncs: 1,
            parses: 1,
            cancels: 0,
            terminates: 1,
        };
        for chunk in 1..=wire.len() {
            let tally = Tally::default();
            let mut parser = FrontendParser::new();
            for piece in wire.chunks(chunk) {
                parser.feed(piece, &tally);
            }
            assert_eq!(tally.snapshot(), want, "chunks of {chunk}");
            assert_eq!(tally.snapshot().round_trips(), 3);
        }
    }

    #[test]
    fn tls_and_cancel_requests_are_not_parsed_as_messages() {
        let tally = Tally::default();
        let mut parser = FrontendParser::new();
        parser.feed(&startup(SSL_REQUEST, b""), &tally);
        parser.feed(&[TLS_HANDSHAKE, 3, 1, b'Q', b'S'], &tally);
        parser.feed(&typed(b'Q', b"SELECT 1\0"), &tally);
        assert_eq!(tally.snapshot(), PgMessages::default());

        let mut parser = FrontendParser::new();
        parser.feed(&startup(CANCEL_REQUEST, &[0; 8]), &tally);
        assert_eq!(tally.snapshot().cancels, 1);
        assert_eq!(tally.snapshot().round_trips(), 0);
    }

    #[test]
    fn since_subtracts_snapshots() {
        let a = PgMessages {
            queries: 5,
            syncs: 7,
            ..PgMessages::default()
        };
        let b = PgMessages {
            queries: 2,
            syncs: 3,
            ..PgMessages::default()
        };
        assert_eq!(a.since(&b).round_trips(), 7);
    }
}
