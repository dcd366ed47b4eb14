//! Facts: the unit of the fast path, and their wire/WAL encoding.
//!
//! A fact is one admitted commutative write (or an escrow transfer between nodes), identified
//! by `(origin node, sequence)`. Sequences are assigned by the origin, start at 1 and have no
//! gaps, so a replica that applies each origin's facts in order can deduplicate with a single
//! comparison against its version vector. That is what makes every fact idempotent by id.
//!
//! Encoding: a fixed 48-byte little-endian header (`FactHeader`, read and written with
//! `zerocopy`, so decoding is a bounds check and a cast) followed by the key and one optional
//! byte payload (a set element or a register value). A fact on a key that was deleted and
//! recreated with another type (generation above 0, see `state.rs`) is format 2: the same
//! header followed by its generation as 8 more bytes. Generation-0 facts stay format 1, so
//! everything written before deletes existed reads unchanged. Lengths are bounded by `KEY_BYTES_MAX` and
//! `PAYLOAD_BYTES_MAX`; a decoder never trusts a length it has not checked against both the
//! limit and the buffer.

use crate::clock::{HlcTimestamp, NodeId};
use thiserror::Error;
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Longest key the store accepts.
pub const KEY_BYTES_MAX: usize = 4 * 1024;
/// Longest register value or set element.
pub const PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Version of the fact encoding, bumped on any incompatible change.
pub const FACT_FORMAT_VERSION: u8 = 1;
/// Format 1 followed by the fact's key generation (only written when it is above 0).
pub const FACT_FORMAT_GENERATION: u8 = 2;

/// Identity of a fact: who admitted it and its position in that node's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FactId {
    pub origin: NodeId,
    pub seq: u64,
}

/// What a fact does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FactKind {
    /// Counter add of `arg`.
    CounterAdd = 1,
    /// Bounded counter add of `arg` paid from the origin's escrow quota (negative = spend).
    BoundedAdd = 2,
    /// Escrow transfer of rights from the origin to node `peer`: `arg` > 0 moves
    /// decrement rights, `arg` < 0 moves increment rights (of magnitude `|arg|`).
    EscrowTransfer = 3,
    /// Max raise to `arg`.
    MaxRaise = 4,
    /// Set add of the payload element.
    SetAdd = 5,
    /// Register write, last-writer-wins (only keys in `available` mode): payload = value.
    RegisterLww = 6,
    /// Register delete, last-writer-wins (only keys in `available` mode).
    RegisterLwwDelete = 7,
}

impl FactKind {
    pub const fn from_u8(raw: u8) -> Option<FactKind> {
        Some(match raw {
            1 => FactKind::CounterAdd,
            2 => FactKind::BoundedAdd,
            3 => FactKind::EscrowTransfer,
            4 => FactKind::MaxRaise,
            5 => FactKind::SetAdd,
            6 => FactKind::RegisterLww,
            7 => FactKind::RegisterLwwDelete,
            _ => return None,
        })
    }
}

/// The fixed header of an encoded fact. All integers little-endian.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FactHeader {
    pub format: u8,
    pub kind: u8,
    pub key_bytes: U16,
    pub payload_bytes: U32,
    pub origin: U64,
    pub seq: U64,
    pub hlc: U64,
    pub arg: I64,
    pub peer: U64,
}

pub const FACT_HEADER_BYTES: usize = size_of::<FactHeader>();
const _: () = assert!(FACT_HEADER_BYTES == 48);
/// The longest header: format 2 adds the generation.
pub const FACT_HEADER_BYTES_MAX: usize = FACT_HEADER_BYTES + size_of::<u64>();

/// A decoded fact borrowing its key and payload from the buffer it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FactRef<'a> {
    pub id: FactId,
    pub kind: FactKind,
    pub hlc: HlcTimestamp,
    pub arg: i64,
    pub peer: NodeId,
    /// The key's generation when the fact was admitted (0 until the key is deleted and
    /// recreated with another type): facts of an older generation are dropped on delivery.
    pub generation: u64,
    pub key: &'a [u8],
    pub payload: &'a [u8],
}

/// An owned fact, as buffered by a replica waiting for earlier facts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fact {
    pub id: FactId,
    pub kind: FactKind,
    pub hlc: HlcTimestamp,
    pub arg: i64,
    pub peer: NodeId,
    pub generation: u64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Fact {
    pub fn as_ref(&self) -> FactRef<'_> {
        FactRef {
            id: self.id,
            kind: self.kind,
            hlc: self.hlc,
            arg: self.arg,
            peer: self.peer,
            generation: self.generation,
            key: &self.key,
            payload: &self.payload,
        }
    }
}

impl FactRef<'_> {
    pub fn to_owned(&self) -> Fact {
        Fact {
            id: self.id,
            kind: self.kind,
            hlc: self.hlc,
            arg: self.arg,
            peer: self.peer,
            generation: self.generation,
            key: self.key.to_vec(),
            payload: self.payload.to_vec(),
        }
    }

    /// Bytes this fact occupies when encoded.
    pub fn encoded_len(&self) -> usize {
        self.header_len() + self.key.len() + self.payload.len()
    }

    fn header_len(&self) -> usize {
        if self.generation == 0 {
            FACT_HEADER_BYTES
        } else {
            FACT_HEADER_BYTES_MAX
        }
    }

    /// Append the encoding to `out`. Does not allocate when `out` has room.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FactError> {
        check_lengths(self.key.len(), self.payload.len())?;
        let header = FactHeader {
            format: if self.generation == 0 {
                FACT_FORMAT_VERSION
            } else {
                FACT_FORMAT_GENERATION
            },
            kind: self.kind as u8,
            key_bytes: U16::new(self.key.len() as u16),
            payload_bytes: U32::new(self.payload.len() as u32),
            origin: U64::new(self.id.origin),
            seq: U64::new(self.id.seq),
            hlc: U64::new(self.hlc.0),
            arg: I64::new(self.arg),
            peer: U64::new(self.peer),
        };
        out.extend_from_slice(header.as_bytes());
        if self.generation != 0 {
            out.extend_from_slice(U64::new(self.generation).as_bytes());
        }
        out.extend_from_slice(self.key);
        out.extend_from_slice(self.payload);
        Ok(())
    }
}

fn check_lengths(key_len: usize, payload_len: usize) -> Result<(), FactError> {
    if key_len == 0 {
        return Err(FactError::EmptyKey);
    }
    if key_len > KEY_BYTES_MAX || key_len > u16::MAX as usize {
        return Err(FactError::KeyTooLong { len: key_len });
    }
    if payload_len > PAYLOAD_BYTES_MAX {
        return Err(FactError::PayloadTooLong { len: payload_len });
    }
    Ok(())
}

/// Decode one fact from the front of `buf`; returns it and the bytes consumed.
pub fn decode_fact(buf: &[u8]) -> Result<(FactRef<'_>, usize), FactError> {
    let (header, rest) = FactHeader::ref_from_prefix(buf).map_err(|_| FactError::Truncated {
        needed: FACT_HEADER_BYTES,
        available: buf.len(),
    })?;
    let (generation, rest, header_len) = match header.format {
        FACT_FORMAT_VERSION => (0, rest, FACT_HEADER_BYTES),
        FACT_FORMAT_GENERATION => {
            let (generation, rest) =
                U64::read_from_prefix(rest).map_err(|_| FactError::Truncated {
                    needed: FACT_HEADER_BYTES_MAX,
                    available: buf.len(),
                })?;
            if generation.get() == 0 {
                return Err(FactError::ZeroGeneration);
            }
            (generation.get(), rest, FACT_HEADER_BYTES_MAX)
        }
        format => return Err(FactError::UnknownFormat { format }),
    };
    let kind =
        FactKind::from_u8(header.kind).ok_or(FactError::UnknownKind { kind: header.kind })?;
    let key_len = header.key_bytes.get() as usize;
    let payload_len = header.payload_bytes.get() as usize;
    check_lengths(key_len, payload_len)?;
    if rest.len() < key_len + payload_len {
        return Err(FactError::Truncated {
            needed: header_len + key_len + payload_len,
            available: buf.len(),
        });
    }
    let seq = header.seq.get();
    if seq == 0 {
        return Err(FactError::ZeroSequence);
    }
    let fact = FactRef {
        id: FactId {
            origin: header.origin.get(),
            seq,
        },
        kind,
        hlc: HlcTimestamp(header.hlc.get()),
        arg: header.arg.get(),
        peer: header.peer.get(),
        generation,
        key: &rest[..key_len],
        payload: &rest[key_len..key_len + payload_len],
    };
    Ok((fact, header_len + key_len + payload_len))
}

/// Iterate over a buffer holding facts back to back (a gossip batch or a WAL record).
pub fn decode_facts(mut buf: &[u8]) -> impl Iterator<Item = Result<FactRef<'_>, FactError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        match decode_fact(buf) {
            Ok((fact, used)) => {
                buf = &buf[used..];
                Some(Ok(fact))
            }
            Err(e) => {
                buf = &[];
                Some(Err(e))
            }
        }
    })
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FactError {
    #[error("fact is truncated: needs {needed} bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error(
        "fact has format version {format}, this build reads versions {FACT_FORMAT_VERSION} and {FACT_FORMAT_GENERATION}; upgrade the node"
    )]
    UnknownFormat { format: u8 },
    #[error("fact has unknown kind {kind}; the sender runs a newer version, upgrade this node")]
    UnknownKind { kind: u8 },
    #[error("keys must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes; the limit is {KEY_BYTES_MAX} bytes, use a shorter key")]
    KeyTooLong { len: usize },
    #[error(
        "value is {len} bytes; the limit is {PAYLOAD_BYTES_MAX} bytes, store large blobs elsewhere"
    )]
    PayloadTooLong { len: usize },
    #[error("fact has sequence 0; sequences start at 1")]
    ZeroSequence,
    #[error(
        "fact is format 2 with generation 0, which is always written as format 1; the sender is broken, report it"
    )]
    ZeroGeneration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let fact = Fact {
            id: FactId { origin: 7, seq: 9 },
            kind: FactKind::SetAdd,
            hlc: HlcTimestamp(123),
            arg: -4,
            peer: 0,
            generation: 0,
            key: b"tags:1".to_vec(),
            payload: b"red".to_vec(),
        };
        let mut buf = Vec::new();
        fact.as_ref().encode_into(&mut buf).unwrap();
        fact.as_ref().encode_into(&mut buf).unwrap();
        assert_eq!(buf.len(), 2 * fact.as_ref().encoded_len());
        let decoded: Vec<_> = decode_facts(&buf).map(|f| f.unwrap().to_owned()).collect();
        assert_eq!(decoded, vec![fact.clone(), fact.clone()]);

        let one = fact.as_ref().encoded_len();
        assert!(matches!(
            decode_fact(&buf[..one - 1]),
            Err(FactError::Truncated { .. })
        ));
        let mut bad = buf[..one].to_vec();
        bad[1] = 99;
        assert_eq!(
            decode_fact(&bad).unwrap_err(),
            FactError::UnknownKind { kind: 99 }
        );
        // A recreated key's fact carries its generation in 8 more bytes; generation 0 is
        // byte-for-byte format 1.
        let recreated = Fact {
            generation: 3,
            ..fact.clone()
        };
        let mut two = Vec::new();
        recreated.as_ref().encode_into(&mut two).unwrap();
        assert_eq!(two.len(), one + 8);
        assert_eq!(two[0], FACT_FORMAT_GENERATION);
        assert_eq!(buf[0], FACT_FORMAT_VERSION);
        let (back, used) = decode_fact(&two).unwrap();
        assert_eq!((back.to_owned(), used), (recreated, two.len()));
        assert!(matches!(
            decode_fact(&two[..FACT_HEADER_BYTES + 4]),
            Err(FactError::Truncated { .. })
        ));
        two[FACT_HEADER_BYTES..FACT_HEADER_BYTES_MAX].fill(0);
        assert_eq!(decode_fact(&two).unwrap_err(), FactError::ZeroGeneration);

        let long_key = vec![b'k'; KEY_BYTES_MAX + 1];
        let too_long = FactRef {
            key: &long_key,
            ..fact.as_ref()
        };
        assert!(matches!(
            too_long.encode_into(&mut Vec::new()),
            Err(FactError::KeyTooLong { .. })
        ));
    }
}
