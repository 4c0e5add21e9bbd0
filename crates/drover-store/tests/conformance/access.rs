//! Conformance: Users, tokens and the audit trail.

use super::*;

pub async fn logins_rotate_and_a_reused_refresh_token_revokes_the_login(store: &impl Store) {
    use drover_store::Role;
    let ttl = Duration::from_secs(900);
    let alice = store
        .create_user("alice", Role::User, "hash")
        .await
        .expect("user");
    assert!(matches!(
        store.create_user("alice", Role::Admin, "h").await,
        Err(StoreError::Conflict(_))
    ));
    let first = store
        .issue_tokens(&alice.id, ttl, ttl)
        .await
        .expect("login");
    let who = store
        .authenticate_token(&first.access_token)
        .await
        .expect("access works");
    assert_eq!(who.name, "alice");
    assert!(
        store
            .authenticate_token(&first.refresh_token)
            .await
            .is_err(),
        "a refresh token is no access token"
    );
    let (_, second) = store
        .rotate_refresh(&first.refresh_token, ttl, ttl)
        .await
        .expect("rotate");
    store
        .authenticate_token(&second.access_token)
        .await
        .expect("new access works");
    // The old refresh token again: the whole login is revoked.
    assert!(matches!(
        store.rotate_refresh(&first.refresh_token, ttl, ttl).await,
        Err(StoreError::UserTokenRefused(_))
    ));
    assert!(
        store
            .authenticate_token(&second.access_token)
            .await
            .is_err()
    );
    assert!(
        store
            .rotate_refresh(&second.refresh_token, ttl, ttl)
            .await
            .is_err()
    );
    // Logout revokes a login's tokens.
    let third = store
        .issue_tokens(&alice.id, ttl, ttl)
        .await
        .expect("login");
    store
        .revoke_family(&third.access_token)
        .await
        .expect("logout");
    assert!(store.authenticate_token(&third.access_token).await.is_err());
    assert!(
        store
            .rotate_refresh(&third.refresh_token, ttl, ttl)
            .await
            .is_err()
    );
    // An expired access token is refused.
    let short = store
        .issue_tokens(&alice.id, Duration::from_micros(1), ttl)
        .await
        .expect("login");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert!(store.authenticate_token(&short.access_token).await.is_err());
}

pub async fn api_tokens_and_owners(store: &impl Store) {
    use drover_store::Role;
    let bob = store
        .create_user("bob", Role::User, "hash")
        .await
        .expect("user");
    let (record, secret) = store
        .create_api_token(&bob.id, "ci", Duration::from_secs(60))
        .await
        .expect("token");
    assert_eq!(record.user, "bob");
    assert_eq!(
        store.authenticate_token(&secret).await.expect("works").id,
        bob.id
    );
    let listed = store.list_api_tokens(Some(&bob.id)).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some(), "last use recorded");
    assert!(matches!(
        store
            .revoke_api_token(&record.id, Some("someone-else"))
            .await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .revoke_api_token(&record.id, Some(&bob.id))
        .await
        .expect("revoke");
    assert!(store.authenticate_token(&secret).await.is_err());
    let (mine, _) = store
        .create_job_for(spec("true"), Some(&bob.id))
        .await
        .expect("job");
    store.create_job(spec("true")).await.expect("job");
    assert_eq!(mine.owner.as_deref(), Some(bob.id.as_str()));
    let of_bob = store
        .list_jobs_of(None, Some(&bob.id), 100)
        .await
        .expect("list");
    assert_eq!(of_bob.len(), 1);
    assert_eq!(store.list_jobs(None, 100).await.expect("all").len(), 2);
    store
        .audit(&drover_store::AuditRecord {
            seq: 0,
            at: Timestamp::now(),
            actor: Some("bob".into()),
            action: "login".into(),
            target: None,
            outcome: "ok".into(),
            address: Some("127.0.0.1".into()),
            detail: None,
        })
        .await
        .expect("audit");
    let audit = store.list_audit(10).await.expect("audit list");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "login");
}

/// Many rotations racing with one refresh token: at most one rotates it, the others are
/// reuse, and reuse revokes every token of the login, the winner's new pair included.
pub async fn concurrent_rotations_of_a_refresh_token_rotate_it_once(store: &impl Store) {
    use drover_store::Role;
    let carol = store
        .create_user("carol", Role::User, "x")
        .await
        .expect("user");
    let ttl = Duration::from_secs(600);
    let login = store
        .issue_tokens(&carol.id, ttl, ttl)
        .await
        .expect("login");
    let results = futures::future::join_all(
        (0..16).map(|_| store.rotate_refresh(&login.refresh_token, ttl, ttl)),
    )
    .await;
    let rotated: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(rotated.len(), 1, "exactly one rotation wins: {results:?}");
    for (_, pair) in rotated {
        assert!(
            store.authenticate_token(&pair.access_token).await.is_err(),
            "the reuse revoked the winner's access token too"
        );
        assert!(
            store
                .rotate_refresh(&pair.refresh_token, ttl, ttl)
                .await
                .is_err()
        );
    }
    assert!(store.authenticate_token(&login.access_token).await.is_err());
}
