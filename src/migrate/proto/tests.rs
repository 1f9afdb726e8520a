//! The wire format under damage, tampering and hostile input.

use super::channel::write_plain;
use super::*;

type End = (Sealer, Opener, [u8; 32]);

/// Both ends of a session, over in-memory buffers.
fn pair(src_key: Option<&Psk>, dst_key: Option<&Psk>) -> Result<(End, End), ProtoError> {
    let (hs, hd) = (Handshake::new(src_key.is_some()), Handshake::new(dst_key.is_some()));
    let (mut bs, mut bd) = (Vec::new(), Vec::new());
    write_handshake(&mut bs, &hs)?;
    write_handshake(&mut bd, &hd)?;
    let seen_by_dst = read_handshake(&mut &bs[..])?;
    let seen_by_src = read_handshake(&mut &bd[..])?;
    let s = channel(src_key, Role::Source, &hs, &seen_by_src, MAX_FRAME)?;
    let d = channel(dst_key, Role::Destination, &hd, &seen_by_dst, MAX_FRAME)?;
    Ok((s, d))
}

fn sample_frames(seal: &mut Sealer) -> (Vec<u8>, Vec<usize>) {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    let data: Vec<u8> = (0..2 * PAGE as usize).map(|i| (i % 7) as u8).collect();
    for k in 0..4u64 {
        seal.write_frame(&mut buf, Kind::Pages, &encode_pages(&[5 + k, 9], &data)).unwrap();
        ends.push(buf.len());
    }
    (buf, ends)
}

#[test]
fn plain_frames_round_trip_and_corruption_is_caught() {
    let ((mut seal, _, _), (_, mut open, _)) = pair(None, None).unwrap();
    let (buf, _) = sample_frames(&mut seal);
    let f = open.read_frame(&mut &buf[..]).unwrap();
    assert_eq!(f.kind, Kind::Pages);
    let (p, _) = decode_pages(&f.payload).unwrap();
    assert_eq!(p, vec![5, 9]);
    let first = buf.len() / 4;
    for i in 0..first {
        let mut b = buf.clone();
        b[i] ^= 0x40;
        let ((_, _, _), (_, mut open, _)) = pair(None, None).unwrap();
        assert!(open.read_frame(&mut &b[..]).is_err(), "flip at {i} undetected");
    }
}

#[test]
fn keyed_frames_refuse_tampering_replay_reordering_truncation_and_a_wrong_key() {
    let k = Psk::from_secret(b"0123456789abcdef0123456789abcdef");
    let ((mut seal, _, ts), (_, mut open, td)) = pair(Some(&k), Some(&k)).unwrap();
    assert_eq!(ts, td, "both sides hash the same transcript");
    let (buf, ends) = sample_frames(&mut seal);
    // In order: every frame opens.
    let mut r = &buf[..];
    for _ in 0..4 {
        assert_eq!(open.read_frame(&mut r).unwrap().kind, Kind::Pages);
    }
    let fresh = |b: &[u8]| {
        let ((mut s2, _, _), (_, mut o2, _)) = pair(Some(&k), Some(&k)).unwrap();
        let _ = sample_frames(&mut s2);
        // A fresh session: a frame from another session does not open.
        o2.read_frame(&mut &b[..]).map(|_| ())
    };
    assert!(matches!(fresh(&buf), Err(ProtoError::Auth(_))), "a frame replayed from another session opened");
    let frame = |i: usize| &buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]];
    let reader = || pair(Some(&k), Some(&k)).unwrap().1 .1;
    // Our own session's frames, reordered or replayed: the counter catches it.
    let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&k)).unwrap();
    let (buf, ends) = sample_frames(&mut seal);
    let f = |i: usize| buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec();
    let replayed = [f(0), f(0)].concat();
    let mut r = &replayed[..];
    open.read_frame(&mut r).unwrap();
    let e = open.read_frame(&mut r).unwrap_err().to_string();
    assert!(e.contains("frame 1 fails authentication"), "{e}");
    let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&k)).unwrap();
    let (buf, ends) = sample_frames(&mut seal);
    let f = |i: usize| buf[if i == 0 { 0 } else { ends[i - 1] }..ends[i]].to_vec();
    let reordered = [f(0), f(2), f(1)].concat();
    let mut r = &reordered[..];
    open.read_frame(&mut r).unwrap();
    assert!(matches!(open.read_frame(&mut r), Err(ProtoError::Auth(_))));
    // Cut mid-frame.
    let cut = &frame(0)[..frame(0).len() / 2];
    assert!(matches!(reader().read_frame(&mut &cut[..]), Err(ProtoError::Truncated)));
    // A different key: the first frame does not open.
    let other = Psk::from_secret(b"another key, also long enough!!!");
    let ((mut seal, _, _), (_, mut open, _)) = pair(Some(&k), Some(&other)).unwrap();
    let (buf, _) = sample_frames(&mut seal);
    let e = open.read_frame(&mut &buf[..]).unwrap_err().to_string();
    assert!(e.contains("different --key-file"), "{e}");
    // One side without a key.
    assert!(matches!(pair(Some(&k), None), Err(ProtoError::Auth(_))));
    assert!(matches!(pair(None, Some(&k)), Err(ProtoError::Auth(_))));
}

#[test]
fn every_flipped_byte_of_a_keyed_frame_is_refused() {
    let k = Psk::from_secret(b"0123456789abcdef");
    let ((mut seal, _, _), _) = pair(Some(&k), Some(&k)).unwrap();
    let mut buf = Vec::new();
    seal.write_frame(&mut buf, Kind::File, &encode_file("some-file", 7, b"abcdef")).unwrap();
    for i in 0..buf.len() {
        let mut b = buf.clone();
        b[i] ^= 0x01;
        // Same keys, fresh counter: rebuild the reader from the same handshake.
        let mut open = Opener { aead: seal_twin(&seal), counter: 0, max_frame: MAX_FRAME };
        assert!(open.read_frame(&mut &b[..]).is_err(), "flip at {i} undetected");
    }
}

/// A reader with the writer's key (unit tests only).
fn seal_twin(s: &Sealer) -> Option<chacha20poly1305::ChaCha20Poly1305> {
    s.aead.clone()
}

#[test]
fn handshake_rejects_other_versions_and_garbage() {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&99u32.to_le_bytes());
    assert!(matches!(read_handshake(&mut &b[..]), Err(ProtoError::Version { theirs: 99 })));
    assert!(matches!(read_handshake(&mut &b"GET / HTTP/1.1\r\n"[..]), Err(ProtoError::Magic)));
}

#[test]
fn oversized_and_truncated_frames_are_errors() {
    let mut h = vec![Kind::Pages as u8];
    h.extend_from_slice(&(MAX_FRAME + 1).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    let mut open = Opener { aead: None, counter: 0, max_frame: MAX_FRAME };
    assert!(matches!(open.read_frame(&mut &h[..]), Err(ProtoError::Corrupt(_))));
    let mut small = Opener { aead: None, counter: 0, max_frame: 1024 };
    let mut buf = Vec::new();
    write_plain(&mut buf, Kind::File, &vec![0u8; 2000]).unwrap();
    let e = small.read_frame(&mut &buf[..]).unwrap_err().to_string();
    assert!(e.contains("exceeds this side's limit"), "{e}");
    let mut buf = Vec::new();
    write_plain(&mut buf, Kind::File, &encode_file("some-file", 7, b"abc")).unwrap();
    buf.truncate(buf.len() - 1);
    assert!(matches!(open.read_frame(&mut &buf[..]), Err(ProtoError::Truncated)));
    assert!(decode_pages(&[255, 255, 255, 255]).is_err());
    assert!(decode_file(&[3, 0, b'a']).is_err());
}

proptest::proptest! {
    /// Whatever arrives, decoding is an answer or an error, never a panic.
    #[test]
    fn decoders_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
        let _ = Opener { aead: None, counter: 0, max_frame: MAX_FRAME }.read_frame(&mut &b[..]);
        let k = Psk::from_secret(b"0123456789abcdef");
        let _ = Opener { aead: Some(chacha20poly1305::KeyInit::new(&chacha20poly1305::Key::from(k.0))), counter: 0, max_frame: MAX_FRAME }.read_frame(&mut &b[..]);
        let _ = read_handshake(&mut &b[..]);
        let _ = decode_pages(&b);
        let _ = decode_numbers(&b);
        let _ = decode_disk(&b);
        let _ = decode_file(&b);
        let _ = unpack(&b);
        let _ = from_json::<Hello>(&b, "hello");
        let _ = from_json::<FinalState>(&b, "state");
    }
}

#[test]
fn packing_compresses_only_when_it_pays() {
    let zeros = vec![0u8; 4096];
    let mut out = Vec::new();
    pack(&zeros, &mut out);
    assert!(out.len() < 200);
    assert_eq!(unpack(&out).unwrap(), zeros);
    let mut x = 1u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut out = Vec::new();
    pack(&noise, &mut out);
    assert_eq!(out[0], 0);
    assert_eq!(unpack(&out).unwrap(), noise);
}
