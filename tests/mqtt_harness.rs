//! The MQTT test harness (tests/common/mqtt.rs) works: brokers start, clients
//! round-trip, mosquitto persistence keeps a session across a restart, TLS
//! and password files are configured right.

mod common;

use std::time::Duration;

use common::mqtt::{
    BrokerKind, BrokerOptions, Subscriber, TestBroker, client_options, publish, publish_with,
    require_mosquitto, tls_transport,
};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};

const WAIT: Duration = Duration::from_secs(10);

/// A JSON message, a retained message seen by a later subscriber, and a 1 MiB payload.
async fn round_trip(port: u16, tag: &str) {
    let sub = Subscriber::start(port, "bf/v1/#", &format!("{tag}-sub")).await;
    publish(port, "bf/v1/test/hello", br#"{"n":1}"#, false).await;
    let got = sub
        .wait_for("bf/v1/test/hello", WAIT, |r| {
            r.iter().any(|m| m.topic == "bf/v1/test/hello")
        })
        .await;
    let hello = got.iter().find(|m| m.topic == "bf/v1/test/hello").unwrap();
    assert_eq!(hello.json(), Some(serde_json::json!({"n": 1})));
    assert!(!hello.retain);

    let big = vec![b'p'; 1 << 20];
    publish(port, "bf/v1/test/big", &big, false).await;
    let got = sub
        .wait_for("the 1 MiB message", WAIT, |r| {
            r.iter().any(|m| m.topic == "bf/v1/test/big")
        })
        .await;
    let m = got.iter().find(|m| m.topic == "bf/v1/test/big").unwrap();
    assert_eq!(m.payload, big);

    publish(port, "bf/v1/test/status", br#"{"online":true}"#, true).await;
    let late = Subscriber::start(port, "bf/v1/test/status", &format!("{tag}-late")).await;
    let got = late
        .wait_for("the retained status", WAIT, |r| !r.is_empty())
        .await;
    assert_eq!(got[0].topic, "bf/v1/test/status");
    assert!(
        got[0].retain,
        "a retained message to a new subscriber has retain set"
    );
}

#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_round_trip() {
    let broker = tokio::task::block_in_place(TestBroker::embedded);
    assert_eq!(broker.kind(), BrokerKind::Embedded);
    round_trip(broker.port(), "emb").await;
    // rumqttd logs through tracing; nothing may reach stdout.
    let stdout = std::fs::read_to_string(broker.dir().join("stdout.log")).unwrap();
    assert_eq!(stdout, "", "`biofoundry broker` wrote to stdout");
}

/// rumqttd keeps sessions in memory only: after a restart the subscriber's
/// session is gone, and the harness's resubscribe-on-ConnAck restores it.
#[cfg(feature = "embedded-broker")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_restart_resubscribes() {
    let mut broker = tokio::task::block_in_place(TestBroker::embedded);
    let port = broker.port();
    let sub = Subscriber::start(port, "bf/v1/#", "emb-restart-sub").await;
    tokio::task::block_in_place(|| {
        broker.kill();
        broker.restart();
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while sub.suback_count() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no resubscription after the restart (last error: {:?})",
            sub.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sub.connacks(), vec![false, false]);
    publish(port, "bf/v1/after", b"x", false).await;
    sub.wait_for("bf/v1/after", WAIT, |r| {
        r.iter().any(|m| m.topic == "bf/v1/after")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_round_trip() {
    if !require_mosquitto("mosquitto_round_trip") {
        return;
    }
    let broker = tokio::task::block_in_place(|| TestBroker::start(BrokerKind::Mosquitto));
    round_trip(broker.port(), "mosq").await;
}

/// The subscriber is held off while the broker is stopped (SIGTERM: the
/// persistence db is saved), restarted and sent a message: the message can
/// only arrive through the session restored from persistence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_survives_stop_and_restart() {
    if !require_mosquitto("mosquitto_persistent_session_survives_stop_and_restart") {
        return;
    }
    persistent_session_survives(false).await;
}

/// Same with SIGKILL: what the last autosave (every second) wrote survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_survives_kill_after_autosave() {
    if !require_mosquitto("mosquitto_persistent_session_survives_kill_after_autosave") {
        return;
    }
    persistent_session_survives(true).await;
}

async fn persistent_session_survives(sigkill: bool) {
    let mut broker = tokio::task::block_in_place(|| TestBroker::mosquitto(&Default::default()));
    let port = broker.port();
    let id = if sigkill {
        "persist-kill"
    } else {
        "persist-stop"
    };
    let sub = Subscriber::start(port, "bf/v1/#", id).await;
    publish(port, "bf/v1/before", b"1", false).await;
    sub.wait_for("bf/v1/before", WAIT, |r| r.len() == 1).await;

    sub.set_paused(true);
    if sigkill {
        // Let an autosave write the session and its subscription.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    tokio::task::block_in_place(|| {
        if sigkill {
            broker.kill();
        } else {
            broker.stop();
        }
        broker.restart();
    });
    publish(port, "bf/v1/after", br#"{"n":2}"#, false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sub.received().len(),
        1,
        "the paused subscriber got messages"
    );
    assert_eq!(
        sub.connacks(),
        vec![false],
        "the paused subscriber reconnected"
    );

    sub.set_paused(false);
    let got = sub
        .wait_for("bf/v1/after, queued in the restored session", WAIT, |r| {
            r.iter().any(|m| m.topic == "bf/v1/after")
        })
        .await;
    assert_eq!(
        sub.connacks(),
        vec![false, true],
        "the session should be present after the restart"
    );
    let after = got.iter().find(|m| m.topic == "bf/v1/after").unwrap();
    assert_eq!(after.json(), Some(serde_json::json!({"n": 2})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_tls_round_trip_trusting_only_the_test_ca() {
    if !require_mosquitto("mosquitto_tls_round_trip_trusting_only_the_test_ca") {
        return;
    }
    let options = BrokerOptions {
        persistence: false,
        tls: true,
        users: Vec::new(),
    };
    let broker = tokio::task::block_in_place(|| TestBroker::mosquitto(&options));
    let port = broker.port();
    let ca = broker.ca_file();
    assert!(ca.is_file());

    let tls = |id: &str| {
        let mut o = client_options(port, id);
        o.set_transport(tls_transport(&ca));
        o
    };
    let sub = Subscriber::start_with(tls("tls-sub"), "bf/v1/#").await;
    let mut pub_options = tls("tls-pub");
    pub_options.set_clean_session(true);
    publish_with(pub_options, "bf/v1/tls", br#"{"tls":true}"#, false).await;
    let got = sub
        .wait_for("bf/v1/tls", WAIT, |r| {
            r.iter().any(|m| m.topic == "bf/v1/tls")
        })
        .await;
    assert_eq!(got[0].json(), Some(serde_json::json!({"tls": true})));

    // Plain MQTT on the TLS port gets no ConnAck.
    let err = first_connack(client_options(port, "plain-on-tls"))
        .await
        .expect_err("a plain client must not connect to the TLS listener");
    assert!(
        !matches!(err, ConnectionError::ConnectionRefused(_)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_users_refuse_wrong_password_and_anonymous() {
    if !require_mosquitto("mosquitto_users_refuse_wrong_password_and_anonymous") {
        return;
    }
    let options = BrokerOptions {
        persistence: false,
        tls: false,
        users: vec![
            ("controller".to_string(), "s3cret".to_string()),
            ("mes".to_string(), "other pass".to_string()),
        ],
    };
    let broker = tokio::task::block_in_place(|| TestBroker::mosquitto(&options));
    let port = broker.port();
    let with = |id: &str, user: &str, password: &str| {
        let mut o = client_options(port, id);
        o.set_credentials(user, password);
        o
    };

    for (what, o) in [
        ("a wrong password", with("bad-pass", "controller", "wrong")),
        ("an unknown user", with("bad-user", "nobody", "s3cret")),
        ("an anonymous client", client_options(port, "anonymous")),
    ] {
        match first_connack(o).await {
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            )) => {}
            other => panic!("{what} should be refused, got {other:?}"),
        }
    }

    let sub = Subscriber::start_with(with("good-sub", "controller", "s3cret"), "bf/v1/#").await;
    let mut o = with("good-pub", "mes", "other pass");
    o.set_clean_session(true);
    publish_with(o, "bf/v1/auth", b"ok", false).await;
    sub.wait_for("bf/v1/auth", WAIT, |r| {
        r.iter()
            .any(|m| m.topic == "bf/v1/auth" && m.payload == b"ok")
    })
    .await;
}

/// Polls a fresh client until its first ConnAck or connection error (5 s).
async fn first_connack(options: MqttOptions) -> Result<(), ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("neither ConnAck nor an error within 5 s")
}
