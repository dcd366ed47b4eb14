//! Server reflection on a node's client port, as grpcurl and Python's grpcio-reflection use
//! it: both protocol versions (grpcurl 1.8 and grpcio-reflection ask v1alpha, newer tools
//! v1), listing the public services and describing them, and never the peer protocol, which
//! the client port does not serve.

mod support;

use support::Cluster;
use tonic_reflection::pb::{v1, v1alpha};

const PUBLIC: [&str; 3] = ["calm.v1.Kv", "calm.v1.Admin", "grpc.health.v1.Health"];
const INTERNAL: [&str; 2] = ["calm.internal.v1.RaftPeer", "calm.internal.v1.GossipPeer"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_v1_and_v1alpha_with_the_public_services_only() {
    let c = Cluster::start(1, &[]).await;

    // v1.
    use v1::server_reflection_request::MessageRequest as Ask;
    use v1::server_reflection_response::MessageResponse as Answer;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(c.channel(1).await);
    let ask = |m: Ask| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = [
        ask(Ask::ListServices(String::new())),
        ask(Ask::FileContainingSymbol("calm.v1.Kv".into())),
        ask(Ask::FileContainingSymbol(INTERNAL[0].into())),
    ];
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection v1 is served")
        .into_inner();
    let mut next = async || {
        answers
            .message()
            .await
            .map(|m| m.and_then(|m| m.message_response))
    };
    let Ok(Some(Answer::ListServicesResponse(list))) = next().await else {
        panic!("v1 did not list the services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in PUBLIC {
        assert!(
            names.iter().any(|n| n == name),
            "v1 lists {names:?}, not {name}"
        );
    }
    for name in INTERNAL {
        assert!(
            !names.iter().any(|n| n == name),
            "v1 advertises {name}: {names:?}"
        );
    }
    assert!(
        matches!(next().await, Ok(Some(Answer::FileDescriptorResponse(f))) if !f.file_descriptor_proto.is_empty()),
        "v1 does not describe calm.v1.Kv"
    );
    // Unknown: tonic-reflection ends the stream with NOT_FOUND.
    match next().await {
        Ok(Some(Answer::ErrorResponse(_))) => {}
        Err(s) if s.code() == tonic::Code::NotFound => {}
        other => panic!("v1 describes the internal peer service: {other:?}"),
    }

    // v1alpha, as grpcurl 1.8 asks.
    use v1alpha::server_reflection_request::MessageRequest as AskAlpha;
    use v1alpha::server_reflection_response::MessageResponse as AnswerAlpha;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(c.channel(1).await);
    let requests = [
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(AskAlpha::ListServices(String::new())),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(AskAlpha::FileContainingSymbol("calm.v1.Admin".into())),
        },
    ];
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection v1alpha is served")
        .into_inner();
    let Some(AnswerAlpha::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha did not list the services");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in PUBLIC {
        assert!(
            names.iter().any(|n| n == name),
            "v1alpha lists {names:?}, not {name}"
        );
    }
    for name in INTERNAL {
        assert!(
            !names.iter().any(|n| n == name),
            "v1alpha advertises {name}: {names:?}"
        );
    }
    assert!(
        matches!(
            answers.message().await.unwrap().unwrap().message_response,
            Some(AnswerAlpha::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty()
        ),
        "v1alpha does not describe calm.v1.Admin"
    );

    // The node's log went to a file, not a terminal: no colour codes in it.
    assert!(
        !c.log(1).contains('\x1b'),
        "ANSI escapes in a log file:\n{}",
        c.log(1)
    );
}
