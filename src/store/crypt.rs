//! Encryption at rest of one volume: its data key and every byte sealed with it.
//!
//! Owns: the master key a user holds ([`MasterKey`]: a key file, or a Kubernetes Secret),
//! the per-volume data key wrapped by it in the volume's configuration, and the three
//! ways the store seals a value with that data key ([`VolumeCipher`]):
//! - contents (symlink targets, xattr values): AES-256-GCM under a key of its own,
//!   derived by HKDF-SHA256 from the data key and a random 192-bit salt stored with the
//!   value (so the 2^32 limit of random 96-bit nonces under one key does not apply: a
//!   volume rewrites data for its whole life under one data key), the value's key as
//!   associated data (a sealed value moved to another key does not open);
//! - chunk bytes the same way, in blocks of [`SEALED_BLOCK`] bytes, each sealed in a slot
//!   of fixed size [`SLOT`] at its place in the chunk value (block `i` at `i * SLOT`), so
//!   that a write of whole blocks is a patch of their slots (a RocksDB merge operand, as
//!   for plain chunks) and a read opens only the blocks it needs; the blocks sealed by one
//!   write share one salt (one key derivation per write), told apart by their nonce (the
//!   block's index); associated data: the chunk's key and the block's index. A slot of
//!   zeros (never written) reads as a block of zeros; the last block is padded with zeros
//!   (what the chunk-length index says is the file's);
//! - names (directory entries and xattr names), which must stay lookups by key: AES-256-GCM
//!   with a synthetic nonce, HMAC-SHA256 of the name and its directory, so one name in
//!   one directory always seals to the same bytes (deterministic, like fscrypt's names:
//!   names are padded to a multiple of 32 bytes, so only their rounded length shows);
//! - the data key itself, sealed by the master key.
//!
//! A sealed content is `salt (24) | ciphertext | tag (16)` ([`OVERHEAD`] bytes more than
//! its plaintext; the nonce is zero, each derived key sealing one value); a sealed name or
//! data key is `nonce (12) | ciphertext | tag (16)`. Subkeys for each use come from the
//! data key by HKDF-SHA256; the fingerprints of the ring of recent answers
//! (`crate::fs::replay`, hashes of names) are keyed with one of them.
//! It knows nothing of keys' layout: [`super::txn`] and [`super::view`] call it.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Random salt of a sealed content, from which its key is derived.
const SALT_LEN: usize = 24;
/// Bytes a sealed content takes beyond its plaintext.
pub const OVERHEAD: usize = SALT_LEN + TAG_LEN;
/// Names are padded with NULs (which no name holds) to a multiple of this.
const NAME_PAD: usize = 32;
/// Plaintext bytes of a sealed chunk block.
pub const SEALED_BLOCK: usize = 4096;
/// Bytes a sealed chunk block takes in its chunk value: salt, ciphertext, tag.
pub const SLOT: usize = SEALED_BLOCK + OVERHEAD;
const KEY_LEN: usize = 32;
/// Associated data of a wrapped data key (its format version).
const WRAP_AAD: &[u8] = b"fusevol volume data key v1";

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("an encryption key is 32 bytes, or 64 hexadecimal digits; this one has {0} bytes")]
    BadKey(usize),
    #[error("cannot read key file {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wrong key: the volume's data key does not open with it")]
    WrongKey,
    #[error("a sealed value failed authentication ({0}): corrupted or tampered with")]
    Tampered(&'static str),
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// The key a user holds for an encrypted volume: 32 bytes. It never touches the disk of
/// the store; it unlocks the volume's own data key. Zeroed when dropped.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

/// Compared for plans (`Wanted` of the agent), never on a secret-dependent path.
impl PartialEq for MasterKey {
    fn eq(&self, other: &Self) -> bool {
        self.0[..] == other.0[..]
    }
}

impl Eq for MasterKey {}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key from its bytes: exactly 32 bytes, or 64 hexadecimal digits (what
    /// `openssl rand -hex 32` prints), surrounding whitespace ignored.
    pub fn from_bytes(b: &[u8]) -> Result<MasterKey, CryptError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if b.len() == KEY_LEN {
            key.copy_from_slice(b);
            return Ok(MasterKey(key));
        }
        let text = b.trim_ascii();
        if text.len() == 2 * KEY_LEN {
            let mut ok = true;
            for (i, pair) in text.chunks(2).enumerate() {
                match (hex_digit(pair[0]), hex_digit(pair[1])) {
                    (Some(h), Some(l)) => key[i] = h << 4 | l,
                    _ => ok = false,
                }
            }
            if ok {
                return Ok(MasterKey(key));
            }
        }
        Err(CryptError::BadKey(b.len()))
    }

    /// The key in file `path` (see [`MasterKey::from_bytes`]).
    pub fn read_file(path: &Path) -> Result<MasterKey, CryptError> {
        let raw = Zeroizing::new(std::fs::read(path).map_err(|source| CryptError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?);
        MasterKey::from_bytes(&raw)
    }

    /// A new random key.
    pub fn generate() -> Result<MasterKey, CryptError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut key[..])?;
        Ok(MasterKey(key))
    }

    /// Creates a volume's data key: its cipher, and the data key sealed by this key (what
    /// the volume's configuration keeps).
    pub fn new_volume_key(&self) -> Result<(VolumeCipher, Vec<u8>), CryptError> {
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut dek[..])?;
        let wrapped = seal_with(&self.aead(), WRAP_AAD, &dek[..])?;
        Ok((VolumeCipher::from_data_key(&dek), wrapped))
    }

    /// Opens a volume's sealed data key; [`CryptError::WrongKey`] if this is not the key
    /// it was sealed with.
    pub fn open_volume_key(&self, wrapped: &[u8]) -> Result<VolumeCipher, CryptError> {
        let dek = Zeroizing::new(
            open_with(&self.aead(), WRAP_AAD, wrapped).map_err(|_| CryptError::WrongKey)?,
        );
        if dek.len() != KEY_LEN {
            return Err(CryptError::WrongKey);
        }
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&dek);
        Ok(VolumeCipher::from_data_key(&k))
    }

    /// The key in hex (for the control socket).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(super::codec::to_hex(&self.0[..]))
    }

    fn aead(&self) -> Aes256Gcm {
        Aes256Gcm::new((&*self.0).into())
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn random(buf: &mut [u8]) -> Result<(), CryptError> {
    getrandom::getrandom(buf).map_err(|e| CryptError::Random(e.to_string()))
}

/// A random u64 from the OS (ids of replica sets and epochs: see `super::replica`).
pub(super) fn random_u64() -> Result<u64, CryptError> {
    let mut b = [0u8; 8];
    random(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The ciphers of one volume, derived from its data key (see the module doc).
pub struct VolumeCipher {
    /// Contents: each sealed under a key derived from this one and a random salt.
    data: Hkdf<Sha256>,
    names: Aes256Gcm,
    name_nonce: Hmac<Sha256>,
    fingerprints: Hmac<Sha256>,
}

impl fmt::Debug for VolumeCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeCipher(aes-256-gcm)")
    }
}

impl VolumeCipher {
    fn from_data_key(dek: &[u8; KEY_LEN]) -> VolumeCipher {
        let hk = Hkdf::<Sha256>::new(None, dek);
        let sub = |info: &[u8]| {
            let mut k = Zeroizing::new([0u8; KEY_LEN]);
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: cannot fail.
            let _ = hk.expand(info, &mut k[..]);
            k
        };
        let (data, names, nonce, fingerprints) = (
            sub(b"fusevol data"),
            sub(b"fusevol names"),
            sub(b"fusevol name nonce"),
            sub(b"fusevol replay fingerprints"),
        );
        VolumeCipher {
            data: Hkdf::<Sha256>::from_prk(&data[..])
                .unwrap_or_else(|_| unreachable!("a 32-byte PRK is long enough")),
            names: Aes256Gcm::new((&*names).into()),
            name_nonce: hmac_key(&nonce[..]),
            fingerprints: hmac_key(&fingerprints[..]),
        }
    }

    /// The AES-256-GCM key of the content sealed with `salt`.
    fn content_key(&self, salt: &[u8]) -> Aes256Gcm {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: cannot fail.
        let _ = self
            .data
            .expand_multi_info(&[b"fusevol content", salt], &mut k[..]);
        Aes256Gcm::new((&*k).into())
    }

    /// Seals contents `plain` stored under `aad` (its key), under a key of its own.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptError> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.resize(SALT_LEN, 0);
        random(&mut out)?;
        let aead = self.content_key(&out[..SALT_LEN]);
        out.extend_from_slice(plain);
        let tag = aead
            .encrypt_in_place_detached(&Nonce::default(), aad, &mut out[SALT_LEN..])
            .map_err(|_| CryptError::Tampered("value too large to seal"))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens contents sealed by [`VolumeCipher::seal`] under `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
        let tampered = CryptError::Tampered("contents");
        if sealed.len() < OVERHEAD {
            return Err(tampered);
        }
        let (salt, rest) = sealed.split_at(SALT_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut out = ct.to_vec();
        self.content_key(salt)
            .decrypt_in_place_detached(&Nonce::default(), aad, &mut out, Tag::from_slice(tag))
            .map_err(|_| tampered)?;
        Ok(out)
    }

    /// Seals `plain` (zero-padded to whole blocks) as the slots of blocks `first..` of the
    /// chunk stored under `key`, under one fresh derived key.
    pub fn seal_blocks(&self, key: &[u8], first: u32, plain: &[u8]) -> Result<Vec<u8>, CryptError> {
        let blocks = plain.len().div_ceil(SEALED_BLOCK);
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let aead = self.content_key(&salt);
        let mut out = Vec::with_capacity(blocks * SLOT);
        for (i, piece) in plain.chunks(SEALED_BLOCK).enumerate() {
            let index = first + i as u32;
            let start = out.len();
            out.extend_from_slice(&salt);
            out.extend_from_slice(piece);
            out.resize(start + SALT_LEN + SEALED_BLOCK, 0);
            let tag = aead
                .encrypt_in_place_detached(
                    &block_nonce(index),
                    &block_aad(key, index),
                    &mut out[start + SALT_LEN..],
                )
                .map_err(|_| CryptError::Tampered("value too large to seal"))?;
            out.extend_from_slice(&tag);
        }
        Ok(out)
    }

    /// Opens blocks `from..to` of chunk value `stored` (under `key`) into `out`
    /// (`(to - from) * SEALED_BLOCK` bytes): zeros for a block past the value's end or in
    /// a slot never written.
    pub fn open_blocks(
        &self,
        key: &[u8],
        stored: &[u8],
        from: usize,
        to: usize,
        out: &mut [u8],
    ) -> Result<(), CryptError> {
        if !stored.len().is_multiple_of(SLOT) {
            return Err(CryptError::Tampered("chunk value of partial blocks"));
        }
        let mut cached: Option<([u8; SALT_LEN], Aes256Gcm)> = None;
        for (n, index) in (from..to).enumerate() {
            let dst = &mut out[n * SEALED_BLOCK..(n + 1) * SEALED_BLOCK];
            let Some(slot) = stored.get(index * SLOT..(index + 1) * SLOT) else {
                dst.fill(0);
                continue;
            };
            if slot.iter().all(|b| *b == 0) {
                dst.fill(0);
                continue;
            }
            let (salt, rest) = slot.split_at(SALT_LEN);
            let (ct, tag) = rest.split_at(SEALED_BLOCK);
            if !matches!(&cached, Some((s, _)) if s[..] == *salt) {
                let mut s = [0u8; SALT_LEN];
                s.copy_from_slice(salt);
                cached = Some((s, self.content_key(salt)));
            }
            let Some((_, aead)) = &cached else {
                return Err(CryptError::Tampered("chunk block"));
            };
            dst.copy_from_slice(ct);
            let index = u32::try_from(index).map_err(|_| CryptError::Tampered("chunk block"))?;
            aead.decrypt_in_place_detached(
                &block_nonce(index),
                &block_aad(key, index),
                dst,
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptError::Tampered("chunk block"))?;
        }
        Ok(())
    }

    /// A fingerprint of names (see `crate::fs::replay`) as stored: keyed, so the store
    /// holds nothing to test guessed names against.
    pub fn fingerprint(&self, fp: u64) -> u64 {
        let mut mac = self.fingerprints.clone();
        mac.update(&fp.to_be_bytes());
        let d = mac.finalize().into_bytes();
        u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }

    /// Seals name `name` in context `ctx` (its directory, or its inode for an xattr
    /// name): the same name in the same context always gives the same bytes.
    pub fn seal_name(&self, ctx: &[u8], name: &[u8]) -> Vec<u8> {
        let mut mac = self.name_nonce.clone();
        mac.update(&(ctx.len() as u32).to_be_bytes());
        mac.update(ctx);
        mac.update(name);
        let digest = mac.finalize().into_bytes();
        let padded = name.len().div_ceil(NAME_PAD).max(1) * NAME_PAD;
        let mut out = Vec::with_capacity(NONCE_LEN + padded + TAG_LEN);
        out.extend_from_slice(&digest[..NONCE_LEN]);
        out.extend_from_slice(name);
        out.resize(NONCE_LEN + padded, 0);
        let nonce = *Nonce::from_slice(&digest[..NONCE_LEN]);
        match self
            .names
            .encrypt_in_place_detached(&nonce, ctx, &mut out[NONCE_LEN..])
        {
            Ok(tag) => out.extend_from_slice(&tag),
            // Only plaintexts above 64 GiB fail; a name is at most 255 bytes.
            Err(_) => unreachable!("AES-GCM refused a {}-byte name", name.len()),
        }
        out
    }

    /// Opens a name sealed by [`VolumeCipher::seal_name`] in context `ctx`.
    pub fn open_name(&self, ctx: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptError> {
        let mut name =
            open_with(&self.names, ctx, sealed).map_err(|_| CryptError::Tampered("name"))?;
        while name.last() == Some(&0) {
            name.pop();
        }
        Ok(name)
    }
}

/// How the values of one volume are stored: as they are, or sealed by its cipher. What
/// [`super::VolumeTxn`] and [`super::VolumeView`] pass every name and content through.
#[derive(Clone, Copy, Default)]
pub(super) struct Sealer<'a>(pub Option<&'a VolumeCipher>);

impl Sealer<'_> {
    /// A name as stored in context `ctx`.
    pub fn name<'n>(&self, ctx: &[u8], name: &'n [u8]) -> Cow<'n, [u8]> {
        match self.0 {
            Some(c) => Cow::Owned(c.seal_name(ctx, name)),
            None => Cow::Borrowed(name),
        }
    }

    /// A name as stored, opened.
    pub fn open_name(&self, ctx: &[u8], stored: Vec<u8>) -> Result<Vec<u8>, CryptError> {
        match self.0 {
            Some(c) => c.open_name(ctx, &stored),
            None => Ok(stored),
        }
    }

    /// Contents `plain` as stored under key `aad`.
    pub fn seal<'p>(&self, aad: &[u8], plain: &'p [u8]) -> Result<Cow<'p, [u8]>, CryptError> {
        match self.0 {
            Some(c) => c.seal(aad, plain).map(Cow::Owned),
            None => Ok(Cow::Borrowed(plain)),
        }
    }

    /// Contents as stored under key `aad`, opened.
    pub fn open<'s>(&self, aad: &[u8], stored: &'s [u8]) -> Result<Cow<'s, [u8]>, CryptError> {
        match self.0 {
            Some(c) => c.open(aad, stored).map(Cow::Owned),
            None => Ok(Cow::Borrowed(stored)),
        }
    }

    /// A fingerprint of names as stored (keyed for an encrypted volume).
    pub fn fingerprint(&self, fp: u64) -> u64 {
        match self.0 {
            Some(c) => c.fingerprint(fp),
            None => fp,
        }
    }

    /// A chunk's plaintext `plain` as stored from block `first` on (whole chunks: 0).
    pub fn seal_chunk<'p>(
        &self,
        key: &[u8],
        first: u32,
        plain: &'p [u8],
    ) -> Result<Cow<'p, [u8]>, CryptError> {
        match self.0 {
            Some(c) => c.seal_blocks(key, first, plain).map(Cow::Owned),
            None => Ok(Cow::Borrowed(plain)),
        }
    }

    /// A chunk value as stored, opened: for an encrypted volume its blocks that hold the
    /// bytes `range` of the chunk (all of them: `None`), at their place (other blocks
    /// zero); as it is for others.
    pub fn open_chunk<'s>(
        &self,
        key: &[u8],
        stored: &'s [u8],
        range: Option<(usize, usize)>,
    ) -> Result<Cow<'s, [u8]>, CryptError> {
        let Some(c) = self.0 else {
            return Ok(Cow::Borrowed(stored));
        };
        let slots = stored.len().div_ceil(SLOT);
        let (from, to) = match range {
            Some((lo, hi)) => (lo / SEALED_BLOCK, hi.div_ceil(SEALED_BLOCK).min(slots)),
            None => (0, slots),
        };
        let mut out = vec![0u8; to.max(from) * SEALED_BLOCK];
        if to > from {
            c.open_blocks(key, stored, from, to, &mut out[from * SEALED_BLOCK..])?;
        }
        Ok(Cow::Owned(out))
    }

    /// How chunk writes must be aligned: whole sealed blocks for an encrypted volume.
    pub fn chunk_granule(&self) -> usize {
        match self.0 {
            Some(_) => SEALED_BLOCK,
            None => 1,
        }
    }

    /// Where chunk byte `offset` is stored in the chunk value.
    pub fn stored_offset(&self, offset: usize) -> usize {
        match self.0 {
            Some(_) => offset / SEALED_BLOCK * SLOT,
            None => offset,
        }
    }

    /// The plaintext bytes a chunk value of `stored` bytes holds (whole blocks when
    /// sealed).
    pub fn chunk_plain_len(&self, stored: usize) -> usize {
        match self.0 {
            Some(_) => stored.div_ceil(SLOT) * SEALED_BLOCK,
            None => stored,
        }
    }

    /// The plaintext length of contents stored in `stored` bytes.
    pub fn plain_len(&self, stored: usize) -> usize {
        match self.0 {
            Some(_) => stored.saturating_sub(OVERHEAD),
            None => stored,
        }
    }

    pub fn is_sealing(&self) -> bool {
        self.0.is_some()
    }
}

/// The nonce of chunk block `index` (unique under the key of the write that sealed it).
fn block_nonce(index: u32) -> aes_gcm::aead::Nonce<Aes256Gcm> {
    let mut n = aes_gcm::aead::Nonce::<Aes256Gcm>::default();
    n[8..].copy_from_slice(&index.to_be_bytes());
    n
}

/// The associated data of chunk block `index` of the chunk stored under `key`.
fn block_aad(key: &[u8], index: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(key.len() + 4);
    aad.extend_from_slice(key);
    aad.extend_from_slice(&index.to_be_bytes());
    aad
}

fn hmac_key(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"))
}

fn seal_with(aead: &Aes256Gcm, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
    out.resize(NONCE_LEN, 0);
    random(&mut out)?;
    let nonce = *Nonce::from_slice(&out[..NONCE_LEN]);
    out.extend_from_slice(plain);
    let tag = aead
        .encrypt_in_place_detached(&nonce, aad, &mut out[NONCE_LEN..])
        .map_err(|_| CryptError::Tampered("value too large to seal"))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

fn open_with(aead: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, ()> {
    if sealed.len() < OVERHEAD {
        return Err(());
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut out = ct.to_vec();
    aead.decrypt_in_place_detached(
        Nonce::from_slice(nonce),
        aad,
        &mut out,
        Tag::from_slice(tag),
    )
    .map_err(|_| ())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> VolumeCipher {
        let master = MasterKey::generate().unwrap();
        master.new_volume_key().unwrap().0
    }

    #[test]
    fn a_key_is_32_bytes_or_64_hex_digits() {
        assert!(MasterKey::from_bytes(&[7u8; 32]).is_ok());
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\n";
        let k = MasterKey::from_bytes(hex.as_bytes()).unwrap();
        assert_eq!(k.0[1], 0x11);
        assert_eq!(k.0[31], 0xff);
        for bad in [
            &b"short"[..],
            &[1u8; 31][..],
            &[b'g'; 64][..],
            &[0u8; 33][..],
        ] {
            let e = MasterKey::from_bytes(bad).unwrap_err();
            assert!(e.to_string().contains("32 bytes"), "{e}");
        }
    }

    #[test]
    fn the_data_key_opens_only_with_its_master_key() {
        let (a, b) = (
            MasterKey::generate().unwrap(),
            MasterKey::generate().unwrap(),
        );
        let (cipher, wrapped) = a.new_volume_key().unwrap();
        let sealed = cipher.seal(b"k", b"hello").unwrap();
        let again = a.open_volume_key(&wrapped).unwrap();
        assert_eq!(again.open(b"k", &sealed).unwrap(), b"hello");
        assert!(matches!(
            b.open_volume_key(&wrapped),
            Err(CryptError::WrongKey)
        ));
        assert!(matches!(
            a.open_volume_key(&wrapped[..10]),
            Err(CryptError::WrongKey)
        ));
    }

    #[test]
    fn contents_open_only_under_their_key_and_untouched() {
        let c = cipher();
        let plain = vec![42u8; 65536];
        let s1 = c.seal(b"chunk 1", &plain).unwrap();
        let s2 = c.seal(b"chunk 1", &plain).unwrap();
        assert_eq!(s1.len(), plain.len() + OVERHEAD);
        assert_ne!(s1, s2, "a fresh salt (and key) each time");
        assert_ne!(s1[SALT_LEN..SALT_LEN + 16], s2[SALT_LEN..SALT_LEN + 16]);
        assert!(!s1.windows(16).any(|w| w == &plain[..16]));
        assert_eq!(c.open(b"chunk 1", &s1).unwrap(), plain);
        assert!(c.open(b"chunk 2", &s1).is_err(), "moved to another key");
        let mut flipped = s1.clone();
        flipped[100] ^= 1;
        assert!(c.open(b"chunk 1", &flipped).is_err());
        assert!(c.open(b"chunk 1", &s1[..20]).is_err());
        assert_eq!(c.open(b"e", &c.seal(b"e", b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn names_seal_deterministically_per_directory() {
        let c = cipher();
        let a = c.seal_name(b"dir 1", b"passwords.txt");
        assert_eq!(a, c.seal_name(b"dir 1", b"passwords.txt"));
        assert_ne!(a, c.seal_name(b"dir 2", b"passwords.txt"));
        assert_ne!(a, c.seal_name(b"dir 1", b"passwords.txu"));
        assert!(!a.windows(9).any(|w| w == b"passwords"));
        assert_eq!(c.open_name(b"dir 1", &a).unwrap(), b"passwords.txt");
        // Lengths show only rounded up to 32 bytes.
        assert_eq!(a.len(), c.seal_name(b"dir 1", b"x").len());
        assert_eq!(a.len(), NONCE_LEN + 32 + TAG_LEN);
        let long = vec![b'n'; 255];
        let sealed = c.seal_name(b"d", &long);
        assert_eq!(sealed.len(), NONCE_LEN + 256 + TAG_LEN);
        assert_eq!(c.open_name(b"d", &sealed).unwrap(), long);
        assert!(c.open_name(b"dir 2", &a).is_err());
        // Another volume's cipher cannot open it.
        assert!(cipher().open_name(b"dir 1", &a).is_err());
    }

    #[test]
    fn chunk_blocks_open_in_place_and_only_under_their_chunk_and_index() {
        let c = cipher();
        let plain: Vec<u8> = (0..3 * SEALED_BLOCK + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let sealed = c.seal_blocks(b"chunk", 0, &plain).unwrap();
        assert_eq!(sealed.len(), 4 * SLOT);
        let mut out = vec![0u8; 4 * SEALED_BLOCK];
        c.open_blocks(b"chunk", &sealed, 0, 4, &mut out).unwrap();
        assert_eq!(&out[..plain.len()], &plain[..]);
        assert!(
            out[plain.len()..].iter().all(|b| *b == 0),
            "padded with zeros"
        );
        // One block alone, and a block past the end or never written reads zeros.
        let mut one = vec![0u8; SEALED_BLOCK];
        c.open_blocks(b"chunk", &sealed, 2, 3, &mut one).unwrap();
        assert_eq!(one, plain[2 * SEALED_BLOCK..3 * SEALED_BLOCK]);
        c.open_blocks(b"chunk", &sealed, 7, 8, &mut one).unwrap();
        assert!(one.iter().all(|b| *b == 0));
        let mut holed = sealed.clone();
        holed[SLOT..2 * SLOT].fill(0);
        c.open_blocks(b"chunk", &holed, 1, 2, &mut one).unwrap();
        assert!(one.iter().all(|b| *b == 0));
        // A patch of block 1 sealed as block 1 of another write opens; moved or under
        // another chunk it does not.
        let patch = c.seal_blocks(b"chunk", 1, &[9u8; SEALED_BLOCK]).unwrap();
        let mut patched = sealed.clone();
        patched[SLOT..2 * SLOT].copy_from_slice(&patch);
        c.open_blocks(b"chunk", &patched, 0, 4, &mut out).unwrap();
        assert_eq!(out[SEALED_BLOCK..2 * SEALED_BLOCK], [9u8; SEALED_BLOCK]);
        assert_eq!(out[..SEALED_BLOCK], plain[..SEALED_BLOCK]);
        let mut moved = sealed.clone();
        moved[..SLOT].copy_from_slice(&patch);
        assert!(c.open_blocks(b"chunk", &moved, 0, 1, &mut one).is_err());
        assert!(c.open_blocks(b"other", &sealed, 0, 1, &mut one).is_err());
        assert!(c
            .open_blocks(b"chunk", &sealed[..SLOT + 1], 0, 1, &mut one)
            .is_err());
        assert!(!sealed.windows(32).any(|w| w == &plain[..32]));
    }

    #[test]
    fn fingerprints_are_keyed_per_volume() {
        let (a, b) = (cipher(), cipher());
        assert_eq!(a.fingerprint(42), a.fingerprint(42));
        assert_ne!(a.fingerprint(42), a.fingerprint(43));
        assert_ne!(a.fingerprint(42), b.fingerprint(42));
        assert_ne!(a.fingerprint(42), 42);
    }
}
