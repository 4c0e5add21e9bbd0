//! Conformance: Reservations.

use super::*;

pub async fn reservations_expire(store: &dyn Store) {
    let w = worker(store).await;
    let r = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let active = store.live_reservations(Timestamp::now()).await.unwrap();
    assert!(active.iter().all(|a| a.id != r.id));
    assert_eq!(
        store.get_reservation(r.id).await.unwrap().state,
        ReservationState::Expired
    );
    // Read past its TTL, a reservation is expired even if no dispatch pass looked yet.
    let unseen = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let read = store.get_reservation(unseen.id).await.unwrap();
    assert_eq!(read.state, ReservationState::Expired);
    assert_eq!(read.ended_at, Some(read.expires_at));
    assert_eq!(store.get_reservation(unseen.id).await.unwrap(), read);
    let held = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_secs(60),
            None,
            ReservationState::Active,
        )
        .await
        .unwrap();
    let released = store.release_reservation(held.id).await.unwrap();
    assert_eq!(released.state, ReservationState::Released);
    let mut s = spec("true");
    s.reservation = Some(held.id);
    assert!(matches!(
        store.create_job(s).await.unwrap_err(),
        StoreError::Invalid {
            field: "reservation",
            ..
        }
    ));
}

pub async fn pending_reservations_wait_then_hold_for_their_whole_ttl(store: &dyn Store) {
    let w = worker(store).await;
    let ttl = Duration::from_secs(60);
    let r = store
        .create_reservation("ollama", 1, w, ttl, Some("ana"), ReservationState::Pending)
        .await
        .unwrap();
    assert_eq!(r.state, ReservationState::Pending);
    // Jobs may be submitted into it; they wait with it.
    let mut s = spec("true");
    s.reservation = Some(r.id);
    store.create_job_for(s, Some("ana")).await.unwrap();
    let live = store.live_reservations(Timestamp::now()).await.unwrap();
    assert_eq!(live.iter().map(|l| l.id).collect::<Vec<_>>(), vec![r.id]);
    // Activated once; the TTL counts from then.
    let later = r.created_at.plus(Duration::from_secs(5));
    assert!(store.activate_reservation(r.id, later).await.unwrap());
    assert!(!store.activate_reservation(r.id, later).await.unwrap());
    let active = store.get_reservation(r.id).await.unwrap();
    assert_eq!(active.state, ReservationState::Active);
    assert_eq!(active.expires_at, later.plus(ttl));
    // A pending one can be released, and one that waited past its TTL expires unused.
    let waiting = store
        .create_reservation("ollama", 1, w, ttl, None, ReservationState::Pending)
        .await
        .unwrap();
    assert_eq!(
        store.release_reservation(waiting.id).await.unwrap().state,
        ReservationState::Released
    );
    let stale = store
        .create_reservation(
            "ollama",
            1,
            w,
            Duration::from_millis(1),
            None,
            ReservationState::Pending,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        !store
            .activate_reservation(stale.id, Timestamp::now())
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_reservation(stale.id).await.unwrap().state,
        ReservationState::Expired
    );
}
