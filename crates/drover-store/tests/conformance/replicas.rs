//! Conformance: Duties shared by replicas.

use super::*;

pub async fn duties_are_held_by_one_holder_at_a_time(store: &dyn Store) {
    let ttl = Duration::from_millis(200);
    assert!(store.hold_duty("sweeper", "a", ttl).await.unwrap());
    assert!(!store.hold_duty("sweeper", "b", ttl).await.unwrap());
    assert!(
        store.hold_duty("sweeper", "a", ttl).await.unwrap(),
        "renewal"
    );
    assert!(store.hold_duty("other", "b", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store.hold_duty("sweeper", "b", ttl).await.unwrap(),
        "taken over after the ttl"
    );
    assert!(!store.hold_duty("sweeper", "a", ttl).await.unwrap());
}
