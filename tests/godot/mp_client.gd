# A real Godot 3.2.3 WebSocketClient in multiplayer mode (gd_mp_api = true, set as the
# tree's network_peer) for tests/test_godot_multiplayer.py. The server is either wsfleet
# (gd_mp_api=True, scripted by the test) or Godot's own server (tests/godot/mp_server.gd).
#
#   godot3-server --no-window -s mp_client.gd --wsfleet-url=ws://127.0.0.1:PORT/ \
#       [--wsfleet-timeout=S]
#
# Options use the "--name=value" form with a "wsfleet-" prefix: Godot 3.2.3 keeps parsing
# its own options after "--".
#
# Every observation goes to stdout as one line "RESULT {json}". The exit status is 0 when
# the run reached its end (every expected call received, the leaver gone, connection
# closed), 2 on the script's own deadline, 3 when the connection failed or ended before
# the script closed it, 4 for bad arguments. The Python side checks the counts.
#
# The run, for a client `me` (the server only relays, confirms paths and answers RAW):
#   1. Connect. Wait for the server's RAW "go:{json}" (send_bytes from peer 1) which
#      names the roster (every client id) and the leaver, and until network_peer_connected
#      has fired for every other roster id.
#   2. Phase 1, the first use of each node path (so SIMPLIFY_PATH + full-path calls):
#        Harness.rpc("hello", me)                       every peer and the server
#        Harness/Inner.rpc_id(next, "direct", me, 1)    the next id in the sorted roster
#        multiplayer.send_bytes("client-raw:<me>", 1)   the server (it answers with RAW
#                                                        "server-raw:<me>" to me)
#      On every "hello" from S: Harness.rpc_id(S, "hello_ack", me).
#   3. Phase 2, once every other client's hello_ack and the server's "server-raw" came in
#      (each sender confirmed the Harness path before that, so these are path-id calls):
#        Harness.rpc("tick", me)                        one frame to=0
#        Harness.rpc_id(next, "direct", me, 2)          one frame to=next
#        Harness.rpc_id(-prev, "all_but", me)           one frame to=-prev
#        multiplayer.send_bytes("rawall:<me>", 0)       one frame to=0
#   4. Once everything expected has come in: Harness.rpc("finished", me). Once every
#      other client said "finished": Harness.rpc("finished_all", me). Once every other
#      client said "finished_all", the leaver does Harness.rpc("bye", me) and closes
#      (1000, "leaving"); the others wait for its network_peer_disconnected, then close
#      (1000, "done").
#   "finished_all" and "bye" are the last calls before a close: whether they arrive is
#   only reported. A Godot client (and Godot's server) that gets a peer's last frames and
#   its SYS_DEL in one poll handles the SYS_DEL first (network_peer_disconnected, the
#   peer's path cache cleared), then drops those frames ("Requests invalid peer cache").
#   So nothing that must arrive is sent by a client after its peers could close.
extends SceneTree

const Common = preload("common.gd")

var client := WebSocketClient.new()
var harness: Node  # /root/Harness (Common.Harness)
var inner: Node  # /root/Harness/Inner
var phase := "connecting"
var finished_run := false
var deadline_ms := 0
var start_ms := 0
var me := 0
var known := {}  # peer id -> true, from network_peer_connected / disconnected
var gone := {}  # peer id -> true, from network_peer_disconnected
var roster := []  # every client id, sorted (from the server's "go")
var leaver := 0
var received := {}  # "sender call node" -> count
var needed := {}  # "sender call node" -> 1, everything phase 1 and 2 must bring
var connected_to_server := false


func report(fields: Dictionary) -> void:
	fields["ms"] = OS.get_ticks_msec() - start_ms
	Common.result(fields)


func end_run(status: int) -> void:
	if finished_run:
		return
	finished_run = true
	var missing := []
	for key in needed:
		if not received.has(key):
			missing.append(key)
	report({
		"event": "exit", "status": status, "phase": phase, "id": me,
		"missing": missing, "received": received,
	})
	quit(status)


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900) every frame.
	OS.low_processor_usage_mode_sleep_usec = 1000
	start_ms = OS.get_ticks_msec()


func _initialize() -> void:
	var url := Common.option("url", "")
	deadline_ms = start_ms + int(float(Common.option("timeout", "20")) * 1000.0)
	if url == "":
		report({"event": "bad_arguments", "args": OS.get_cmdline_args()})
		end_run(4)
		return
	var nodes := Common.add_harness(self, self)
	harness = nodes[0]
	inner = nodes[1]
	connect("network_peer_connected", self, "_on_peer_connected")
	connect("network_peer_disconnected", self, "_on_peer_disconnected")
	connect("connected_to_server", self, "_on_connected_to_server")
	connect("connection_failed", self, "_on_connection_failed")
	connect("server_disconnected", self, "_on_server_disconnected")
	client.connect("connection_closed", self, "_on_connection_closed")
	client.connect("server_close_request", self, "_on_server_close_request")
	var err: int = client.connect_to_url(url, PoolStringArray(), true)
	report({"event": "connect_to_url", "error": err, "url": url})
	if err != OK:
		end_run(3)
		return
	network_peer = client
	multiplayer.connect("network_peer_packet", self, "_on_raw")


func _idle(_delta: float) -> bool:
	if finished_run:
		return false
	if OS.get_ticks_msec() > deadline_ms:
		report({"event": "timeout", "phase": phase, "known": known.keys(), "gone": gone.keys()})
		end_run(2)
		return false
	step()
	return false


# -- the run ------------------------------------------------------------------------------


func neighbour(offset: int) -> int:
	var i := roster.find(me)
	return roster[(i + offset + roster.size()) % roster.size()]


func others() -> Array:
	var out := []
	for id in roster:
		if id != me:
			out.append(id)
	return out


func key(sender: int, call: String, node: String) -> String:
	return "%d %s %s" % [sender, call, node]


func from_others(call: String) -> Array:
	var keys := []
	for id in others():
		keys.append(key(id, call, "Harness"))
	return keys


func has_all(keys: Array) -> bool:
	for k in keys:
		if not received.has(k):
			return false
	return true


func step() -> void:
	match phase:
		"await_go":
			if roster.empty():
				return
			for id in others():
				if not known.has(id):
					return
			phase_1()
		"phase_1":
			var acks := [key(1, "server-raw", "raw")]
			for id in others():
				acks.append(key(id, "hello_ack", "Harness"))
			if has_all(acks):
				phase_2()
		"collecting":
			if has_all(needed.keys()):
				phase = "finishing"
				report({"event": "all_received"})
				harness.rpc("finished", me)
		"finishing":
			if has_all(from_others("finished")):
				harness.rpc("finished_all", me)
				phase = "await_all_ready" if me == leaver else "await_leaver"
		"await_all_ready":
			if has_all(from_others("finished_all")):
				harness.rpc("bye", me)
				close("leaving")
		"await_leaver":
			if gone.has(leaver):
				close("done")
		"closing":
			# Whichever the engine reports first: connection_failed (what 3.2.3 reports),
			# connection_closed, server_disconnected, network_peer_disconnected(1), or
			# only the status.
			if client.get_connection_status() == NetworkedMultiplayerPeer.CONNECTION_DISCONNECTED:
				report({"event": "status_disconnected"})
				end_run(0)


func phase_1() -> void:
	phase = "phase_1"
	var next: int = neighbour(1)
	var prev: int = neighbour(-1)
	for id in others():
		needed[key(id, "hello", "Harness")] = 1
		needed[key(id, "hello_ack", "Harness")] = 1
		needed[key(id, "tick", "Harness")] = 1
		needed[key(id, "rawall", "raw")] = 1
		if id != next:  # the next one leaves me out of its all_but
			needed[key(id, "all_but", "Harness")] = 1
	if prev != me:
		needed[key(prev, "direct", "Inner")] = 1
		needed[key(prev, "direct", "Harness")] = 1
	needed[key(1, "go", "raw")] = 1
	needed[key(1, "server-raw", "raw")] = 1
	report({"event": "phase_1", "me": me, "next": next, "prev": prev, "needed": needed.keys()})
	harness.rpc("hello", me)
	inner.rpc_id(next, "direct", me, 1)
	multiplayer.send_bytes(("client-raw:%d" % me).to_utf8(), 1)


func phase_2() -> void:
	phase = "collecting"
	report({"event": "phase_2"})
	harness.rpc("tick", me)
	harness.rpc_id(neighbour(1), "direct", me, 2)
	harness.rpc_id(-neighbour(-1), "all_but", me)
	multiplayer.send_bytes(("rawall:%d" % me).to_utf8(), 0)


func close(reason: String) -> void:
	phase = "closing"
	report({"event": "close", "reason": reason})
	client.disconnect_from_host(1000, reason)


# -- what comes in ------------------------------------------------------------------------


func note(sender: int, call: String, node: String) -> void:
	var k := key(sender, call, node)
	received[k] = received.get(k, 0) + 1


func on_rpc(call: String, args: Array, node: Node) -> void:
	var sender := get_rpc_sender_id()
	report({"event": "rpc", "from": sender, "call": call, "args": args, "node": node.name})
	note(sender, call, node.name)
	if call == "hello":
		harness.rpc_id(sender, "hello_ack", get_network_unique_id())


func _on_raw(sender: int, packet: PoolByteArray) -> void:
	var text := packet.get_string_from_utf8()
	report({"event": "raw", "from": sender, "text": text, "hex": Common.hex(packet)})
	if sender == 1 and text.begins_with("go:"):
		var parsed := JSON.parse(text.substr(3, text.length() - 3))
		if parsed.error != OK or typeof(parsed.result) != TYPE_DICTIONARY:
			report({"event": "bad_go", "text": text})
			end_run(4)
			return
		roster = []
		for id in parsed.result["roster"]:
			roster.append(int(id))
		roster.sort()
		leaver = int(parsed.result["leaver"])
		note(1, "go", "raw")
	elif sender == 1 and text.begins_with("server-raw:"):
		note(1, "server-raw", "raw")
	elif text.begins_with("rawall:"):
		note(sender, "rawall", "raw")
	else:
		note(sender, "unknown", "raw")


func _on_peer_connected(id: int) -> void:
	known[id] = true
	report({"event": "peer_connected", "peer": id, "unique_id": get_network_unique_id()})


func _on_peer_disconnected(id: int) -> void:
	gone[id] = true
	known.erase(id)
	report({"event": "peer_disconnected", "peer": id, "phase": phase})
	if id == 1 and phase == "closing":
		end_run(0)


func _on_connected_to_server() -> void:
	me = get_network_unique_id()
	connected_to_server = true
	report({"event": "connected_to_server", "id": me, "known": known.keys()})
	if phase == "connecting":
		phase = "await_go"


func _on_connection_failed() -> void:
	# Godot 3.2.3's WebSocketClient in multiplayer mode reports every end of the
	# connection, its own clean close included, as connection_failed.
	report({"event": "connection_failed", "phase": phase})
	end_run(0 if phase == "closing" else 3)


func _on_server_disconnected() -> void:
	report({"event": "server_disconnected", "phase": phase})
	end_run(0 if phase == "closing" else 3)


func _on_connection_closed(was_clean: bool) -> void:
	report({"event": "connection_closed", "was_clean": was_clean, "phase": phase})
	if phase == "closing":
		end_run(0)


func _on_server_close_request(code: int, reason: String) -> void:
	report({"event": "server_close_request", "code": code, "reason": reason, "phase": phase})
