//! The discovery messages as this node reads them.

use bytes::Bytes;
use sluice_proto::pb;

/// A `DiscoveryResponse` with its snapshot left encoded: a slice of the received bytes,
/// which [`crate::config::Holdings::from_encoded`] checks and takes in one API key at a time.
/// Decoded whole, a snapshot of a million keys would take three times its size in memory.
/// Same field numbers as `sluice.v1.DiscoveryResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Received {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub content_hash: String,
    #[prost(string, tag = "3")]
    pub nonce: String,
    #[prost(oneof = "Payload", tags = "10, 11, 12, 13")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    /// An encoded `Snapshot`.
    #[prost(bytes = "bytes", tag = "10")]
    Snapshot(Bytes),
    #[prost(message, boxed, tag = "11")]
    Delta(Box<pb::Delta>),
    #[prost(message, tag = "12")]
    Heartbeat(pb::Heartbeat),
    #[prost(message, tag = "13")]
    SnapshotPart(pb::SnapshotPart),
}

/// Opens the discovery stream, reading responses as [`Received`].
pub async fn stream_config(
    channel: tonic::transport::Channel,
    requests: impl tonic::IntoStreamingRequest<Message = pb::DiscoveryRequest>,
    max_response_bytes: usize,
) -> Result<tonic::Streaming<Received>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(max_response_bytes);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("the control plane is not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static("/sluice.v1.Discovery/StreamConfig");
    let codec = tonic_prost::ProstCodec::<pb::DiscoveryRequest, Received>::default();
    Ok(grpc
        .streaming(requests.into_streaming_request(), path, codec)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn reads_what_the_control_plane_writes() {
        let snapshot = pb::Snapshot {
            resources: Some(pb::ConfigSet::default()),
            api_keys: vec![pb::ApiKeyEntry {
                id: vec![1; 16],
                ..Default::default()
            }],
        };
        let sent = pb::DiscoveryResponse {
            version: 3,
            content_hash: "hash".into(),
            nonce: "n".into(),
            payload: Some(pb::discovery_response::Payload::Snapshot(snapshot.clone())),
        };
        let received = Received::decode(Bytes::from(sent.encode_to_vec())).unwrap();
        assert_eq!(
            (
                received.version,
                received.content_hash.as_str(),
                received.nonce.as_str()
            ),
            (3, "hash", "n")
        );
        assert_eq!(
            received.payload,
            Some(Payload::Snapshot(Bytes::from(snapshot.encode_to_vec())))
        );
        let delta = pb::Delta {
            base_version: 2,
            ..Default::default()
        };
        let sent = pb::DiscoveryResponse {
            payload: Some(pb::discovery_response::Payload::Delta(delta.clone())),
            ..sent
        };
        let received = Received::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(received.payload, Some(Payload::Delta(Box::new(delta))));
    }
}
