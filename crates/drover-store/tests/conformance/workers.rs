//! Conformance: Nodes: join tokens, registration, provisioning.

use super::*;

pub async fn join_tokens_work_once(store: &dyn Store) {
    let token = store
        .create_join_token(Duration::from_secs(60))
        .await
        .unwrap();
    let caps = Capabilities::default();
    let (w, credential) = store
        .register_worker(&token.token, "a", &caps)
        .await
        .unwrap();
    let err = store
        .register_worker(&token.token, "b", &caps)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::JoinTokenRefused(_)), "{err}");
    assert!(matches!(
        store
            .register_worker("drover-join-bogus", "c", &caps)
            .await
            .unwrap_err(),
        StoreError::JoinTokenRefused(_)
    ));
    let expired = store.create_join_token(Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(matches!(
        store
            .register_worker(&expired.token, "d", &caps)
            .await
            .unwrap_err(),
        StoreError::JoinTokenRefused(_)
    ));
    assert_eq!(
        store.authenticate_worker(&credential).await.unwrap().id,
        w.id
    );
    let forged = format!("{}.{}", w.id, "0".repeat(64));
    assert!(matches!(
        store.authenticate_worker(&forged).await.unwrap_err(),
        StoreError::NodeCredentialRefused
    ));
}

pub async fn provisioning_is_a_recorded_workflow(store: &impl Store) {
    let cluster = store.cluster_id().await.expect("cluster id");
    assert_eq!(store.cluster_id().await.expect("again"), cluster, "stable");
    let by = Timestamp::now().plus(Duration::from_secs(60));
    let (worker, token) = store
        .begin_provisioning("docker", "docker-1", by)
        .await
        .expect("begin");
    assert_eq!(worker.state, drover_core::WorkerState::Registering);
    assert_eq!(worker.provider.as_deref(), Some("docker"));
    assert_eq!(
        store.provided_workers("docker").await.expect("list").len(),
        1
    );
    assert!(
        store
            .provided_workers("local")
            .await
            .expect("list")
            .is_empty()
    );
    store
        .set_worker_resource(worker.id, "c0ffee")
        .await
        .expect("resource");
    let (registered, credential) = store
        .register_worker(&token.token, "in-container", &Capabilities::default())
        .await
        .expect("register the provisioned record");
    assert_eq!(
        registered.id, worker.id,
        "the token registers that very record"
    );
    assert_eq!(registered.resource_id.as_deref(), Some("c0ffee"));
    store
        .authenticate_worker(&credential)
        .await
        .expect("credential works");
    let ended = drover_core::EventKind::WorkerTerminated {
        reason: "idle".into(),
    };
    assert!(
        store
            .end_worker(worker.id, drover_core::WorkerState::Terminated, &ended)
            .await
            .expect("end")
    );
    assert!(
        !store
            .end_worker(worker.id, drover_core::WorkerState::Terminated, &ended)
            .await
            .expect("end twice"),
        "ending twice changes nothing"
    );
    assert!(matches!(
        store.authenticate_worker(&credential).await,
        Err(StoreError::NodeCredentialRefused)
    ));
    assert!(
        store
            .provided_workers("docker")
            .await
            .expect("list")
            .is_empty()
    );
    let got = store.get_worker(worker.id).await.expect("get");
    assert_eq!(got.state, drover_core::WorkerState::Terminated);
    let events = store.worker_events(worker.id).await.expect("events");
    assert_eq!(
        event_types(&events),
        vec![
            "ProvisioningStarted",
            "ProvisioningStepCompleted",
            "ProvisioningStepCompleted",
            "WorkerRegistered",
            "ProvisioningStepCompleted",
            "WorkerTerminated",
        ]
    );
}

pub async fn a_given_up_provisioning_refuses_its_token(store: &impl Store) {
    let by = Timestamp::now().plus(Duration::from_secs(60));
    let (worker, token) = store
        .begin_provisioning("local", "local-1", by)
        .await
        .expect("begin");
    let compensated = drover_core::EventKind::ProvisioningCompensated {
        reason: "never registered".into(),
        resource_id: None,
    };
    store
        .end_worker(
            worker.id,
            drover_core::WorkerState::Terminated,
            &compensated,
        )
        .await
        .expect("end");
    let refused = store
        .register_worker(&token.token, "late", &Capabilities::default())
        .await;
    assert!(
        matches!(refused, Err(StoreError::JoinTokenRefused(_))),
        "{refused:?}"
    );
}

/// Many registrations racing with one one-time token: exactly one node registers (on
/// PostgreSQL they run on separate connections at once; SQLite's one writer orders them).
pub async fn a_join_token_registers_one_node_under_concurrent_callers(store: &impl Store) {
    let caps = Capabilities::default();
    // Several rounds: each is one race, which a lost update does not lose every time.
    for round in 0..8 {
        let token = store
            .create_join_token(Duration::from_secs(60))
            .await
            .expect("token");
        let names: Vec<String> = (0..16).map(|i| format!("racer-{round}-{i}")).collect();
        let results = futures::future::join_all(
            names
                .iter()
                .map(|name| store.register_worker(&token.token, name, &caps)),
        )
        .await;
        let registered = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(registered, 1, "round {round}: {results:?}");
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(refused, StoreError::JoinTokenRefused(_)),
                "{refused:?}"
            );
        }
    }
    let workers = store.list_workers().await.expect("workers");
    assert_eq!(
        workers
            .iter()
            .filter(|w| w.name.starts_with("racer-"))
            .count(),
        8
    );
}
