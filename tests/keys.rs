//! Keys: a wrong passphrase or key file is a clear error at open and
//! nothing is written to the bucket.

mod common;

use std::sync::Arc;

use common::*;
use zerofs_ublk::Error;
use zerofs_ublk::store::backend::{DynStore, MemoryStore};
use zerofs_ublk::store::keys::Secret;
use zerofs_ublk::volume::Volume;

fn snapshot(mem: &MemoryStore) -> Vec<(String, Vec<u8>)> {
    mem.raw_objects()
        .lock()
        .iter()
        .map(|(k, v)| (k.clone(), v.to_vec()))
        .collect()
}

async fn volume_with(secret: &Secret) -> (MemoryStore, DynStore) {
    let mem = MemoryStore::new();
    let store: DynStore = Arc::new(mem.clone());
    Volume::create(&store, &params(8), secret, false)
        .await
        .unwrap();
    let vol = Volume::open(store.clone(), secret, writer(false), test_config())
        .await
        .unwrap();
    vol.write(0, &pattern(9, 8192)).await.unwrap();
    vol.close().await.unwrap();
    (mem, store)
}

async fn refused(store: &DynStore, mem: &MemoryStore, secret: Secret) -> Error {
    let before = snapshot(mem);
    let err = Volume::open(store.clone(), &secret, writer(true), test_config())
        .await
        .expect_err("must not open");
    assert_eq!(before, snapshot(mem), "nothing written on a refused open");
    err
}

#[tokio::test]
async fn wrong_key_file_is_refused_and_writes_nothing() {
    let (mem, store) = volume_with(&secret()).await;
    let err = refused(&store, &mem, Secret::key_file(vec![0x43; 32]).unwrap()).await;
    assert!(matches!(err, Error::WrongKey), "{err:?}");
    assert!(err.to_string().contains("wrong passphrase or key file"));
}

#[tokio::test]
async fn wrong_passphrase_is_refused_and_writes_nothing() {
    let pass = Secret::passphrase(b"correct horse\n".to_vec()).unwrap();
    let (mem, store) = volume_with(&pass).await;
    let err = refused(
        &store,
        &mem,
        Secret::passphrase(b"battery staple".to_vec()).unwrap(),
    )
    .await;
    assert!(matches!(err, Error::WrongKey), "{err:?}");
    // The trailing newline of a passphrase file is not part of it.
    let ok = Secret::passphrase(b"correct horse".to_vec()).unwrap();
    let vol = Volume::open(store.clone(), &ok, read_only(), test_config())
        .await
        .unwrap();
    assert_eq!(vol.read(0, 8192).await.unwrap(), pattern(9, 8192));
}

#[tokio::test]
async fn key_kind_mismatch_is_explained() {
    let (mem, store) = volume_with(&secret()).await;
    let err = refused(&store, &mem, Secret::passphrase(b"pass".to_vec()).unwrap()).await;
    assert!(err.to_string().contains("protected by a key file"), "{err}");
}

#[test]
fn weak_secrets_are_rejected() {
    assert!(Secret::key_file(vec![1; 31]).is_err(), "short key file");
    assert!(
        Secret::passphrase(b"\n".to_vec()).is_err(),
        "empty passphrase"
    );
}

#[tokio::test]
async fn nothing_but_the_superblock_is_plaintext() {
    // Known plaintext written to the volume must not appear in any object.
    let marker = b"THIS-IS-A-SECRET-MARKER-STRING--".repeat(128);
    let mem = MemoryStore::new();
    let store: DynStore = Arc::new(mem.clone());
    let vol = create_and_open(&store, 8).await;
    vol.write(0, &marker).await.unwrap();
    vol.close().await.unwrap();
    for (key, data) in snapshot(&mem) {
        assert!(
            !data.windows(16).any(|w| w == &marker[..16]),
            "plaintext visible in {key}"
        );
    }
}

/// Issue 10, finding 9: the Argon2 costs come from the superblock, which
/// anyone with write access to the bucket can rewrite (its checksum is not
/// a MAC). Absurd costs are refused at once, before any allocation.
#[tokio::test]
async fn tampered_argon2_costs_are_refused_quickly() {
    use zerofs_ublk::store::keys::KdfParams;
    use zerofs_ublk::store::superblock::Superblock;
    let pass = Secret::passphrase(b"correct horse".to_vec()).unwrap();
    let (mem, store) = volume_with(&pass).await;
    let mut sb = Superblock::decode(&store.get("superblock").await.unwrap()).unwrap();
    let KdfParams::Argon2id { cost, .. } = &mut sb.params.kdf else {
        panic!("passphrase volume");
    };
    cost.m_cost_kib = u32::MAX; // 4 TiB
    cost.t_cost = u32::MAX;
    store.put("superblock", sb.encode().into()).await.unwrap();
    let started = std::time::Instant::now();
    let err = refused(&store, &mem, pass).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(
        err.to_string().contains("Argon2 cost out of bounds"),
        "{err}"
    );
}
