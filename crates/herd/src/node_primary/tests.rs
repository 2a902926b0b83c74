use super::*;

#[test]
fn a_send_keeps_the_apps_message_byte_for_byte() {
    let request = parse(br#"{"herd":"send","id":2,"pid":7,"msg":{"z":1,"a":[1.50,"x"]}}"#).unwrap();
    assert_eq!(
        request,
        Request::Send {
            to: Target {
                id: 2,
                pid: Some(7)
            },
            line: b"{\"z\":1,\"a\":[1.50,\"x\"]}\n".to_vec(),
            handle: false
        }
    );
}

#[test]
fn a_send_with_a_handle_becomes_the_workers_node_handle_line() {
    let line = br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"herd":"send","id":1,"msg":{"type":"sticky:connection","data":"GET /"}},"key":"::6:3000"}"#;
    let Request::Send { to, line, handle } = parse(line).unwrap() else {
        panic!("a send")
    };
    assert!(handle);
    assert_eq!(to, Target { id: 1, pid: None });
    let sent: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"type":"sticky:connection","data":"GET /"}})
    );
    assert!(line.ends_with(b"}\n"));
}

#[test]
fn the_other_requests_parse() {
    assert_eq!(
        parse(br#"{"herd":"kill","id":3,"signal":"SIGKILL"}"#).unwrap(),
        Request::Kill {
            to: Target { id: 3, pid: None },
            signal: "SIGKILL".into()
        }
    );
    assert_eq!(
        parse(br#"{"herd":"disconnect","id":3}"#).unwrap(),
        Request::Disconnect {
            to: Target { id: 3, pid: None }
        }
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#).unwrap(),
        Request::HandleAnswer
    );
    assert_eq!(
        parse(br#"{"cmd":"NODE_SOCKET_NOTIFY_CLOSE","key":"k"}"#).unwrap(),
        Request::Other
    );
    assert_eq!(parse(br#"{"anything":1}"#).unwrap(), Request::Other);
    assert!(parse(b"not json").is_err());
}

#[test]
fn herds_lines_are_json_the_shim_reads() {
    let lines = [
        fork(1, 42),
        worker_event("online", 1, 42),
        message(1, 42, br#"{"type":"x"}"#),
        exit(1, 42, None, Some("SIGKILL")),
        exit(2, 43, Some(0), None),
    ];
    for line in lines {
        assert!(line.ends_with(b"\n"));
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(value["herd"].is_string() && value["id"].is_u64(), "{value}");
    }
    let exited: serde_json::Value =
        serde_json::from_slice(&exit(1, 42, None, Some("SIGKILL"))).unwrap();
    assert_eq!(exited["signal"], "SIGKILL");
    assert!(exited["code"].is_null());
}

#[test]
fn a_workers_handle_reaches_the_primary_as_a_message_with_a_handle() {
    let line = br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"type":"take-over"},"key":"x"}"#;
    let relayed = handle_message(2, 7, line).unwrap();
    assert!(relayed.ends_with(b"}}\n"));
    let value: serde_json::Value = serde_json::from_slice(&relayed).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"herd":"message","id":2,"pid":7,"msg":{"type":"take-over"}}})
    );
    assert_eq!(handle_message(2, 7, br#"{"cmd":"NODE_HANDLE"}"#), None);
}
