# A real Godot 3.2.3 WebSocketClient (plain mode, not the multiplayer relay) that talks
# to a wsfleet server for tests/test_godot_client.py.
#
#   godot3-server --no-window -s client.gd -- --wsfleet-url=ws://127.0.0.1:PORT/path \
#       --wsfleet-protocols=godot-test,chat --wsfleet-scenario=main|close [--wsfleet-timeout=S]
#
# Options use the "--name=value" form with a "wsfleet-" prefix: Godot 3.2.3 keeps parsing
# its own options after "--" (an "-v" or "--quit" there is taken by the engine).
#
# Every observation goes to stdout as one line "RESULT {json}". The exit status is 0 when
# the scenario ran to its end and every check passed, 1 when a check failed, 2 on the
# script's own deadline, 3 when the connection failed, 4 for bad arguments.
#
# Scenarios (the Python side plays the server's part):
#   main   send a text and a binary packet, expect both echoed in the same mode; put_var
#          every value of VARS; expect the server's put_var of the same values and check
#          them with get_var; send the text "vars-checked"; expect the server to close
#          with 4001 "kick" (server_close_request, then connection_closed).
#   close  wait for the text "please-close", then disconnect_from_host(4000, "bye") and
#          wait for connection_closed.
extends SceneTree

const Common = preload("common.gd")
const TEXT_PAYLOAD = "héllo wörld ✓ 日本 🎮"

var client := WebSocketClient.new()
var scenario := ""
var phase := "connecting"
var failures := 0
var deadline_ms := 0
var finished := false
var binary_payload := PoolByteArray()
var echoes_seen := 0
var vars_seen := 0


func vars() -> Array:
	# [name, value]; tests/test_godot_client.py has the same list as Python values.
	var nested := {}
	nested["ok"] = true
	var dict := {}
	dict["name"] = "wsfleet"
	dict["n"] = 7
	dict["list"] = [1, 2]
	dict["nested"] = nested
	dict[3] = "int key"
	return [
		["int32", 42],
		["int64", 1099511627776],
		["negative", -7],
		["float32", 1.5],
		["float64", 0.1],
		["string", TEXT_PAYLOAD],
		["vector2", Vector2(1.5, -2.0)],
		["vector3", Vector3(1.0, 2.0, 3.0)],
		["color", Color(1.0, 0.5, 0.0, 1.0)],
		["array", [1, "two", 3.0, [4, [5.5, "six"]], Vector2(0.25, 8.0), null, true]],
		["dictionary", dict],
		["bytes", PoolByteArray([0, 1, 2, 127, 128, 255, 10])],
	]


func report(fields: Dictionary) -> void:
	Common.result(fields)


func check(what: String, ok: bool, details: Dictionary = {}) -> void:
	var fields := {"check": what, "ok": ok}
	for key in details:
		fields[key] = details[key]
	report(fields)
	if not ok:
		failures += 1


func end_run(status: int) -> void:
	if finished:
		return
	finished = true
	if status == 0 and failures > 0:
		status = 1
	report({"event": "exit", "status": status, "failures": failures, "phase": phase})
	quit(status)


# Deep equality with types: Godot 3 compares Dictionaries by reference, and 1 == 1.0.
func same(a, b) -> bool:
	if typeof(a) != typeof(b):
		return false
	match typeof(a):
		TYPE_ARRAY, TYPE_RAW_ARRAY, TYPE_INT_ARRAY, TYPE_REAL_ARRAY, TYPE_STRING_ARRAY:
			if a.size() != b.size():
				return false
			for i in range(a.size()):
				if not same(a[i], b[i]):
					return false
			return true
		TYPE_DICTIONARY:
			if not same(a.keys(), b.keys()):  # insertion order too
				return false
			for key in a:
				if not same(a[key], b[key]):
					return false
			return true
		_:
			return a == b


func _init() -> void:
	# Headless Godot sleeps low_processor_usage_mode_sleep_usec (6900) every frame.
	OS.low_processor_usage_mode_sleep_usec = 1000
	var url := Common.option("url", "")
	scenario = Common.option("scenario", "main")
	var protocols := PoolStringArray()
	var protocol_list := Common.option("protocols", "")
	if protocol_list != "":
		protocols = PoolStringArray(protocol_list.split(","))
	deadline_ms = OS.get_ticks_msec() + int(float(Common.option("timeout", "20")) * 1000.0)
	for i in range(300):  # over 125 bytes: a 16-bit frame length
		binary_payload.append((i * 7) % 256)
	if url == "" or not scenario in ["main", "close"]:
		report({"event": "bad_arguments", "args": OS.get_cmdline_args()})
		end_run(4)
		return
	client.connect("connection_established", self, "_on_established")
	client.connect("connection_error", self, "_on_error")
	client.connect("connection_closed", self, "_on_closed")
	client.connect("server_close_request", self, "_on_close_request")
	client.connect("data_received", self, "_on_data")
	var err: int = client.connect_to_url(url, protocols, false)
	report({"event": "connect_to_url", "error": err, "url": url, "protocols": Array(protocols)})
	if err != OK:
		end_run(3)


func _idle(_delta: float) -> bool:
	if finished:
		return false
	if OS.get_ticks_msec() > deadline_ms:
		report({"event": "timeout", "phase": phase})
		end_run(2)
		return false
	# Status DISCONNECTED once closed: polling then does nothing.
	client.poll()
	return false


func _on_established(protocol: String) -> void:
	var peer := client.get_peer(1)
	report({
		"event": "connected",
		"protocol": protocol,
		"host": peer.get_connected_host(),
		"port": peer.get_connected_port(),
		"write_mode": peer.get_write_mode(),
	})
	if scenario == "main":
		phase = "echo"
		peer.set_write_mode(WebSocketPeer.WRITE_MODE_TEXT)
		check("put_text", peer.put_packet(TEXT_PAYLOAD.to_utf8()) == OK)
		peer.set_write_mode(WebSocketPeer.WRITE_MODE_BINARY)
		check("put_binary", peer.put_packet(binary_payload) == OK)
	else:
		phase = "await_close_order"


func _on_error() -> void:
	report({"event": "connection_error", "phase": phase})
	end_run(3)


func _on_close_request(code: int, reason: String) -> void:
	report({"event": "server_close_request", "code": code, "reason": reason, "phase": phase})


func _on_closed(was_clean_close: bool) -> void:
	report({"event": "connection_closed", "was_clean": was_clean_close, "phase": phase})
	var expected := "await_kick" if scenario == "main" else "closing"
	check("closed_in_phase", phase == expected, {"phase": phase, "expected": expected})
	phase = "closed"
	end_run(0)


func _on_data() -> void:
	var peer := client.get_peer(1)
	while peer.get_available_packet_count() > 0:
		if phase == "echo":
			_on_echo(peer)
		elif phase == "vars_in":
			_on_var(peer)
		elif phase == "await_close_order":
			var order := peer.get_packet()
			var ok := peer.was_string_packet() and order.get_string_from_utf8() == "please-close"
			check("close_order", ok, {"hex": Common.hex(order), "was_string": peer.was_string_packet()})
			phase = "closing"
			client.disconnect_from_host(4000, "bye")
			return
		else:
			var extra := peer.get_packet()
			check("unexpected_packet", false, {"phase": phase, "hex": Common.hex(extra)})


func _on_echo(peer: WebSocketPeer) -> void:
	var data := peer.get_packet()
	var text := peer.was_string_packet()
	var first := echoes_seen == 0
	var sent := TEXT_PAYLOAD.to_utf8() if first else binary_payload
	check("echo_text" if first else "echo_binary", text == first and same(data, sent), {
		"was_string": text, "size": data.size(), "hex": Common.hex(data).substr(0, 80)
	})
	echoes_seen += 1
	if echoes_seen < 2:
		return
	# Send every value with put_var (binary frames), then wait for the server's.
	for item in vars():
		check("put_var", peer.put_var(item[1]) == OK, {"name": item[0]})
	phase = "vars_in"


func _on_var(peer: WebSocketPeer) -> void:
	var items := vars()
	var got = peer.get_var()
	var error := peer.get_packet_error()
	var item: Array = items[vars_seen]
	check("get_var", error == OK and same(got, item[1]), {
		"name": item[0],
		"error": error,
		"was_string": peer.was_string_packet(),
		"got": var2str(got),
		"got_type": typeof(got),
		"expected": var2str(item[1]),
	})
	vars_seen += 1
	if vars_seen == items.size():
		peer.set_write_mode(WebSocketPeer.WRITE_MODE_TEXT)
		check("put_vars_checked", peer.put_packet("vars-checked".to_utf8()) == OK)
		phase = "await_kick"
