//! Tests of the Node cluster IPC wire format: parsing, replies byte for
//! byte, framing across reads, handle discipline.

use super::*;

/// The `listen(3000)` sequence captured from Node v20 (issue 6).
#[test]
fn the_captured_listen_sequence_parses() {
    assert_eq!(
        parse(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#).unwrap(),
        NodeMessage::Online
    );
    let query = parse(
        br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"seq":1}"#,
    )
    .unwrap();
    let NodeMessage::QueryServer(query) = query else {
        panic!("{query:?}")
    };
    assert_eq!(query.key, "null:3000:4:undefined:0");
    assert_eq!((query.seq, query.port), (1, Some(3000)));
    assert_eq!(
        (&query.address, query.fd, query.ipv6_only),
        (&None, None, false)
    );
    // v22 adds "flags": still the same request.
    let v22 = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"flags":0,"seq":1}"#;
    assert_eq!(parse(v22).unwrap(), NodeMessage::QueryServer(query.clone()));
    assert_eq!(
        parse(br#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"seq":2}"#).unwrap(),
        NodeMessage::Listening
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#).unwrap(),
        NodeMessage::HandleAck
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#).unwrap(),
        NodeMessage::Accepted {
            ack: 1,
            accepted: true
        }
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_CLUSTER","act":"close","key":"null:3000:4:undefined:0","seq":4}"#)
            .unwrap(),
        NodeMessage::Close {
            key: "null:3000:4:undefined:0".into()
        }
    );
}

#[test]
fn replies_match_what_nodes_primary_sends() {
    let query = QueryServer {
        seq: 1,
        address: None,
        port: Some(3000),
        ipv6_only: false,
        fd: None,
        data: Value::Null,
        key: "null:3000:4:undefined:0".into(),
    };
    let reply = query_reply(&query, Some("[::]:3000".parse().unwrap()), None, 0);
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        reply,
        json!({"cmd":"NODE_CLUSTER","errno":null,"key":"null:3000:4:undefined:0","ack":1,"data":null,"sockname":{"address":"::","family":"IPv6","port":3000},"seq":0})
    );
    assert_eq!(
        newconn("null:3000:4:undefined:0", 1),
        b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"null:3000:4:undefined:0\",\"seq\":1}}\n"
    );
    assert_eq!(
        disconnect(2),
        b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":2}\n"
    );
    let refused = query_reply(&query, None, Some(uv_errno(nix::Error::EADDRINUSE)), 0);
    let refused: Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!(refused["errno"], -98);
    assert!(refused.get("sockname").is_none());
    // Shared mode: the reply is a handle message carrying the socket.
    let shared: Value = serde_json::from_slice(&query_reply_with_server(&query, 3)).unwrap();
    assert_eq!(
        shared,
        json!({"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","errno":null,"key":"null:3000:4:undefined:0","ack":1,"data":null,"seq":3}})
    );
}

/// Keys are Node's template strings, whatever the app listened on.
#[test]
fn queries_for_other_servers_keep_nodes_keys() {
    let query_of = |line: &[u8]| match parse(line).unwrap() {
        NodeMessage::QueryServer(query) => query,
        other => panic!("{other:?}"),
    };
    let local = query_of(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":1,"data":{"ticketKeys":"x"},"address":"127.0.0.1","port":0,"addressType":4,"backlog":511,"flags":1,"seq":5}"#);
    assert_eq!(local.key, "127.0.0.1:0:4:undefined:1");
    assert_eq!(local.address.as_deref(), Some("127.0.0.1"));
    assert_eq!((local.port, local.ipv6_only), (Some(0), true));
    assert_eq!(local.data, json!({"ticketKeys": "x"}));
    // A Unix socket path and UDP are not TCP ports: herd refuses them.
    let pipe = query_of(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"/tmp/app.sock","port":-1,"addressType":-1,"seq":1}"#);
    assert_eq!(
        (pipe.port, pipe.key.as_str()),
        (None, "/tmp/app.sock:-1:-1:undefined:0")
    );
    let udp = query_of(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"0.0.0.0","port":41234,"addressType":"udp4","seq":1}"#);
    assert_eq!(
        (udp.port, udp.key.as_str()),
        (None, "0.0.0.0:41234:udp4:undefined:0")
    );
    let fd = query_of(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":null,"port":0,"addressType":4,"fd":7,"seq":1}"#);
    assert_eq!((fd.fd, fd.key.as_str()), (Some(7), "null:0:4:7:0"));
}

/// Handles are pipelined, each on its own `sendmsg`, so each arrives
/// in a read of its own with its whole line; answers match in order.
#[test]
fn every_handle_arrives_alone_with_its_whole_line() {
    let (ours, theirs) = fdpass::stream_pair().unwrap();
    let channel = ours.as_fd();
    let socket = || -> OwnedFd { std::net::TcpListener::bind("127.0.0.1:0").unwrap().into() };
    let mut node = NodeChannel::default();
    node.add_server(ListenerIx(0), "k0".into());
    node.send_line(channel, b"line-1\n".to_vec()).unwrap();
    node.send_server(channel, b"server-2\n".to_vec(), socket().as_fd())
        .unwrap();
    for id in [3, 4] {
        node.send_connection(channel, id, ListenerIx(0), socket().as_fd())
            .unwrap();
    }
    node.send_line(channel, b"line-5\n".to_vec()).unwrap();
    assert!(!node.wants_write());
    // A read ends with the skb that carries fds: one handle per read.
    let mut buf = [0u8; 4096];
    let mut reads = Vec::new();
    while let Ok(Some(received)) = fdpass::recv_with_fd(theirs.as_fd(), &mut buf, true) {
        let text = String::from_utf8(buf[..received.len].to_vec()).unwrap();
        reads.push((text, received.fd.is_some()));
    }
    assert_eq!(reads.len(), 4, "{reads:?}");
    assert_eq!(reads[0], ("line-1\nserver-2\n".to_string(), true));
    for (read, id) in reads[1..3].iter().zip([3, 4]) {
        assert!(
            read.1
                && read
                    .0
                    .ends_with(&format!("\"key\":\"k0\",\"seq\":{id}}}}}\n")),
            "{read:?}"
        );
    }
    assert_eq!(reads[3], ("line-5\n".to_string(), false));
    assert_eq!(node.handle_answered(), Some(SentHandle::Server));
    assert_eq!(node.handle_answered(), Some(SentHandle::Connection(3)));
    assert_eq!(node.handle_answered(), Some(SentHandle::Connection(4)));
    assert_eq!(node.handle_answered(), None);
}

/// A connection is never queued behind unsent bytes: the caller is told
/// WouldBlock and offers it to another worker; once the worker reads,
/// the queue drains and handles go out again.
#[test]
fn a_full_channel_refuses_connections_until_it_drains() {
    let (ours, theirs) = fdpass::stream_pair().unwrap();
    let channel = ours.as_fd();
    let connection: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
    let mut node = NodeChannel::default();
    let mut lines = 0;
    while !node.wants_write() {
        node.send_line(channel, vec![b'x'; 64 * 1024]).unwrap();
        lines += 1;
        assert!(lines < 1000, "the socket never filled");
    }
    let refused = node.send_connection(channel, 1, ListenerIx(0), connection.as_fd());
    assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    assert_eq!(node.handle_answered(), None, "nothing was sent");
    let mut buf = vec![0u8; 64 * 1024];
    while node.wants_write() {
        while let Ok(Some(_)) = fdpass::recv_with_fd(theirs.as_fd(), &mut buf, true) {}
        node.flush(channel).unwrap();
    }
    node.send_connection(channel, 2, ListenerIx(0), connection.as_fd())
        .unwrap();
    assert_eq!(node.handle_answered(), Some(SentHandle::Connection(2)));
}

#[test]
fn a_worker_serves_the_listeners_it_asked_for() {
    let mut node = NodeChannel::default();
    assert!(!node.listening());
    node.add_server(ListenerIx(0), "null:3000:4:undefined:0".into());
    node.add_server(ListenerIx(2), "null:0:4:undefined:0".into());
    assert!(
        node.listening()
            && node.serves(ListenerIx(0))
            && node.serves(ListenerIx(2))
            && !node.serves(ListenerIx(1))
    );
    node.remove_server("null:3000:4:undefined:0");
    assert!(!node.serves(ListenerIx(0)) && node.serves(ListenerIx(2)));
}

/// With the app's primary running, a worker's own handle is kept for
/// it with its line, and the read stops there; without, it is closed.
#[test]
fn a_workers_own_handle_is_kept_only_for_the_apps_primary() {
    let line = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Socket\",\"msg\":{\"a\":1}}\n";
    for relay in [false, true] {
        let (ours, theirs) = fdpass::stream_pair().unwrap();
        let socket: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
        fdpass::sendmsg_with_fd(theirs.as_fd(), line, socket.as_fd()).unwrap();
        fdpass::send_stream(theirs.as_fd(), b"{\"b\":2}\n").unwrap();
        let mut node = NodeChannel::default();
        if relay {
            node.relay_app_messages();
        }
        let mut out = Vec::new();
        let read = node.read(ours.as_fd(), &mut out).unwrap();
        if relay {
            assert_eq!(read, Read::More, "stops at the handle");
            assert_eq!(
                out,
                [NodeMessage::AppHandle(line[..line.len() - 1].to_vec())]
            );
            assert!(node.take_relayed_handle().is_some());
            out.clear();
            node.read(ours.as_fd(), &mut out).unwrap();
            assert_eq!(out, [NodeMessage::AppLine(b"{\"b\":2}".to_vec())]);
        } else {
            assert_eq!(out[0], NodeMessage::Handle);
            assert!(node.take_relayed_handle().is_none());
        }
    }
}

#[test]
fn keys_are_escaped_in_newconn() {
    let odd = "we\"ird\\:80:4:undefined:0";
    let message: Value = serde_json::from_slice(&newconn(odd, 9)).unwrap();
    assert_eq!(message["msg"]["key"], odd);
    assert_eq!(message["msg"]["seq"], 9);
}

#[test]
fn user_messages_and_handles_are_told_apart() {
    assert_eq!(parse(br#"{"hello":"world"}"#).unwrap(), NodeMessage::App);
    assert_eq!(
        parse(br#"{"cmd":"stats","n":1}"#).unwrap(),
        NodeMessage::App
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_SOMETHING_NEW"}"#).unwrap(),
        NodeMessage::Other
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"x":1}}"#).unwrap(),
        NodeMessage::Handle
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":7}"#).unwrap(),
        NodeMessage::ExitedAfterDisconnect { seq: 7 }
    );
    assert!(parse(b"not json").is_err());
    // A queryServer without a port still gets an answer (a refusal).
    let NodeMessage::QueryServer(bare) =
        parse(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","seq":1}"#).unwrap()
    else {
        panic!("a queryServer")
    };
    assert_eq!((bare.port, bare.seq), (None, 1));
}
