# Godot 3.2.3's own WebSocketServer in multiplayer mode (gd_mp_api = true, set as the
# tree's network_peer): the reference that tests/test_godot_multiplayer.py runs
# tests/godot/mp_client.gd against, and a relay for benchmarks.
#
#   godot3-server --no-window -s mp_server.gd --wsfleet-port=PORT \
#       [--wsfleet-clients=N] [--wsfleet-timeout=S] [--wsfleet-quiet=1]
#
# Options use the "--name=value" form with a "wsfleet-" prefix: Godot 3.2.3 keeps parsing
# its own options after "--".
#
# The server relays (the engine does that), and has a node at /root/Harness (and
# /root/Harness/Inner) with the clients' remote functions, so that calls to the server
# and SIMPLIFY_PATH/CONFIRM_PATH work. With --wsfleet-clients=N (N > 0) it also plays the
# server's part of mp_client.gd's run, which the Python test plays against wsfleet:
#   - once N clients are connected, send each the RAW "go:{"roster": [ids], "leaver": id}"
#     (send_bytes(..., id)); the leaver is the lowest id;
#   - answer every RAW "client-raw:<id>" with RAW "server-raw:<id>" to that client;
#   - once every roster client has left, print the summary and exit 0.
# With N = 0 it is a pure relay until the deadline (--wsfleet-timeout=0: none).
#
# Every observation goes to stdout as one line "RESULT {json}" (only "listening", "go",
# summaries and errors with --wsfleet-quiet=1). The exit status is 0 when the run reached
# its end, 2 on the deadline, 3 when listen failed, 4 for bad arguments.
extends SceneTree

const Common = preload("common.gd")

var server := WebSocketServer.new()
var expected_clients := 0
var quiet := false
var deadline_ms := 0
var start_ms := 0
var finished_run := false
var roster := []
var went := false
var connected := {}  # peer id -> true
var left := []
var received := {}  # "sender call node" -> count


func report(fields: Dictionary) -> void:
	fields["ms"] = OS.get_ticks_msec() - start_ms
	Common.result(fields)


func end_run(status: int) -> void:
	if finished_run:
		return
	finished_run = true
	report({
		"event": "exit", "status": status, "roster": roster, "left": left,
		"received": received, "connected": connected.keys(),
	})
	server.stop()
	quit(status)


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900) every frame.
	OS.low_processor_usage_mode_sleep_usec = int(Common.option("sleep-usec", "1000"))
	start_ms = OS.get_ticks_msec()


func _initialize() -> void:
	var port := int(Common.option("port", "0"))
	expected_clients = int(Common.option("clients", "0"))
	quiet = Common.option("quiet", "0") == "1"
	var timeout := float(Common.option("timeout", "30"))
	deadline_ms = start_ms + int(timeout * 1000.0) if timeout > 0 else 0
	if port <= 0 or expected_clients < 0:
		report({"event": "bad_arguments", "args": OS.get_cmdline_args()})
		end_run(4)
		return
	Common.add_harness(self, self)
	var err: int = server.listen(port, PoolStringArray(), true)
	if err != OK:
		report({"event": "listen_failed", "error": err, "port": port})
		end_run(3)
		return
	network_peer = server
	connect("network_peer_connected", self, "_on_peer_connected")
	connect("network_peer_disconnected", self, "_on_peer_disconnected")
	multiplayer.connect("network_peer_packet", self, "_on_raw")
	server.connect("client_close_request", self, "_on_close_request")
	report({
		"event": "listening", "port": port, "unique_id": get_network_unique_id(),
		"status": server.get_connection_status(),
	})


func _idle(_delta: float) -> bool:
	if finished_run:
		return false
	if deadline_ms > 0 and OS.get_ticks_msec() > deadline_ms:
		report({"event": "timeout", "connected": connected.keys()})
		end_run(2)
	return false


func note(sender: int, call: String, node: String) -> void:
	var k := "%d %s %s" % [sender, call, node]
	received[k] = received.get(k, 0) + 1


func on_rpc(call: String, args: Array, node: Node) -> void:
	var sender := get_rpc_sender_id()
	if not quiet:
		report({"event": "rpc", "from": sender, "call": call, "args": args, "node": node.name})
	note(sender, call, node.name)


func _on_raw(sender: int, packet: PoolByteArray) -> void:
	var text := packet.get_string_from_utf8()
	if not quiet:
		report({"event": "raw", "from": sender, "text": text, "hex": Common.hex(packet)})
	if expected_clients == 0:
		return
	if text.begins_with("client-raw:"):
		note(sender, "client-raw", "raw")
		multiplayer.send_bytes(("server-raw:%d" % sender).to_utf8(), sender)
	elif text.begins_with("rawall:"):
		note(sender, "rawall", "raw")
	else:
		note(sender, "unknown", "raw")


func _on_peer_connected(id: int) -> void:
	connected[id] = true
	if not quiet:
		report({"event": "peer_connected", "peer": id})
	if expected_clients == 0 or went or connected.size() < expected_clients:
		return
	went = true
	roster = connected.keys()
	roster.sort()
	var go := "go:" + JSON.print({"roster": roster, "leaver": roster[0]})
	report({"event": "go", "roster": roster, "leaver": roster[0]})
	for peer in roster:
		multiplayer.send_bytes(go.to_utf8(), peer)


func _on_peer_disconnected(id: int) -> void:
	connected.erase(id)
	left.append(id)
	if not quiet:
		report({"event": "peer_disconnected", "peer": id})
	if went and connected.empty():
		end_run(0)


func _on_close_request(id: int, code: int, reason: String) -> void:
	if not quiet:
		report({"event": "close_request", "peer": id, "code": code, "reason": reason})
