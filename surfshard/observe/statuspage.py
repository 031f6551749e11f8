"""The cluster as one node sees it: ``/cluster`` (JSON) and a live page at
``/`` on every node's port.

``/cluster`` asks every node of the config for its status (one short call
each, all at once) and the ShardMaster for the latest shard map, and
answers with both: the map with each shard's hash range and owner, each
group's leader, terms, commit and applied indexes, how far each follower
lags its leader, the shards moving, and the block stores. ``/`` is one
self-contained HTML page (no external assets: nodes often have no internet)
that fetches ``/cluster`` every second and draws it; it reads on a phone.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from surfshard.config import ClusterConfig, NodeKind, member_addresses, node_name
from surfshard.keyspace import shard_range
from surfshard.net.interfaces import IRpcPool
from surfshard.replica.leader_caller import LeaderCaller

__all__ = ["ClusterResource", "ClusterView", "PageResource"]

log = Logger()

#: One status call waits at most this long: a dead node must not hold the page.
CALL_TIMEOUT = 1.0


class ClusterView:
    """Collects the cluster's state through ``pool`` (from node ``me``)."""

    def __init__(self, cluster: ClusterConfig, pool: IRpcPool, me: str, reactor: IReactorTime) -> None:
        self.cluster = cluster
        self.pool = pool
        self.me = me
        # The ShardMaster's leader, followed from the config's replicas to
        # any added since (kept between refreshes: one call each, mostly).
        self._shardmaster = (
            LeaderCaller(
                pool,
                cluster.shardmaster,
                reactor,
                timeout=2 * CALL_TIMEOUT,
                attempt_timeout=CALL_TIMEOUT,
                learn_members=True,
            )
            if cluster.shardmaster
            else None
        )

    @defer.inlineCallbacks
    def collect(self) -> Any:
        cluster = self.cluster
        shard_map = yield self._shard_map()
        # (No ShardMaster answered the map: no use asking it for its members.)
        members = {} if shard_map["num"] is None else (yield self._shardmaster_members())
        # Replicas added to a group while it runs are not in the config: the
        # ShardMaster's list of the group's addresses has them (and its own
        # membership, its own added replicas).
        refs = cluster.nodes_with_members(shard_map.get("groups", {}), members)
        # And replicas taken out stay in the config: shown as removed, not down.
        removed = cluster.removed_replicas(shard_map.get("groups", {}), members)
        calls = [self._status(ref.address) for ref in refs]
        answers = yield defer.gatherResults(calls)
        nodes = []
        for ref, (status, error) in zip(refs, answers, strict=True):
            # Raft ids are index + 1.
            index = ref.index if ref.index >= 0 else int((status or {}).get("id", 0)) - 1
            nodes.append(
                {
                    "name": node_name(ref.kind, ref.gid, index) if index >= 0 else f"group-{ref.gid}-?",
                    "kind": NodeKind(ref.kind).value,
                    "gid": ref.gid,
                    "index": index,
                    "address": ref.address,
                    "status": status,
                    "error": error,
                    "removed": ref.address in removed,
                }
            )
        shards = []
        for shard, gid in enumerate(shard_map["shards"]):
            lo, hi = shard_range(shard, cluster.shards)
            shards.append({"shard": shard, "lo": f"{lo:016x}", "hi": f"{hi - 1:016x}", "gid": gid})
        return {
            "cluster": cluster.name,
            "seen_from": self.me,
            "time": time.time(),
            "nshards": cluster.shards,
            "map": {"num": shard_map["num"], "shards": shards},
            "groups": self._groups(nodes),
            "nodes": nodes,
        }

    def _status(self, address: str) -> defer.Deferred:
        d = self.pool.call(address, "status", {}, CALL_TIMEOUT)
        d.addCallbacks(lambda s: (s, None), lambda f: (None, f.getErrorMessage()[:200]))
        return d

    @defer.inlineCallbacks
    def _shard_map(self) -> Any:
        cluster = self.cluster
        if cluster.static:
            return {"num": 0, "shards": [next(iter(cluster.groups))] * cluster.shards}
        if self._shardmaster is not None:
            try:
                answer = yield self._shardmaster.call("query", {"num": -1})
            except Exception:
                pass
            else:
                return {
                    "num": answer.get("num", 0),
                    "shards": answer.get("shards", [0] * cluster.shards),
                    "groups": answer.get("groups", {}),
                }
        return {"num": None, "shards": [0] * cluster.shards}

    @defer.inlineCallbacks
    def _shardmaster_members(self) -> Any:
        """The ShardMaster's members by Raft id (none known: {})."""
        if self._shardmaster is None:
            return {}
        try:
            answer = yield self._shardmaster.call("members", {})
        except Exception:
            return {}
        return member_addresses(answer)

    @staticmethod
    def _groups(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per replica group (the ShardMaster's included): its leader and
        each member's lag behind the leader's last index."""
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for n in nodes:
            if n["kind"] != NodeKind.BLOCKSTORE.value:
                groups.setdefault((n["kind"], n["gid"]), []).append(n)
        out = []
        for (kind, gid), members in groups.items():
            leader = next((m for m in members if (m["status"] or {}).get("role") == "leader"), None)
            progress = (leader["status"] or {}).get("progress", {}) if leader else {}
            last = (leader["status"] or {}).get("last_index", 0) if leader else 0
            rows = []
            for m in members:
                st = m["status"] or {}
                match = (progress.get(str(m["index"] + 1)) or progress.get(m["index"] + 1) or {}).get("match")
                rows.append(
                    {
                        "name": m["name"],
                        "address": m["address"],
                        "role": _role(m, st),
                        "term": st.get("term"),
                        "commit": st.get("commit"),
                        "applied": st.get("applied"),
                        "lag": 0 if m is leader else (last - match if leader and match is not None else None),
                        "moving": st.get("moving", []),
                        "shards": st.get("owned_shards"),
                    }
                )
            out.append(
                {
                    "kind": kind,
                    "gid": gid,
                    "leader": leader["name"] if leader else None,
                    "leader_address": leader["address"] if leader else None,
                    "members": rows,
                }
            )
        return out


def _role(node: dict[str, Any], status: dict[str, Any]) -> str | None:
    """What the page says a member is: a replica taken out of its group is
    "removed" (with its role if it still runs), not "down"."""
    if node.get("removed"):
        return "removed" if node["error"] else f"removed ({status.get('role')})"
    if node["error"]:
        return "down"
    return "crashed" if status.get("crashed") else status.get("role")


class ClusterResource(Resource):
    """``GET /cluster``: ``ClusterView.collect()`` as JSON."""

    isLeaf = True

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)  # the browser went away: nothing to write

        def write(body: Any) -> None:
            if not finished.called:
                request.write(json.dumps(body).encode("utf-8"))
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("status page: collecting the cluster's state failed", failure)
            if not finished.called:
                request.setResponseCode(500)
                request.write(b'{"error": "could not collect the cluster state"}')
                request.finish()

        self.view.collect().addCallbacks(write, failed)
        return NOT_DONE_YET


class PageResource(Resource):
    """``GET /``: the live status page."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return PAGE.encode("utf-8")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SurfShard cluster</title>
<style>
body{font:15px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#1d2330}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.sub{color:#667;font-size:13px}.card{background:#fff;border-radius:8px;padding:10px;margin:8px 0;box-shadow:0 1px 2px #0001;overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eee;white-space:nowrap}
th{color:#556;font-weight:600}.leader{color:#0a7d32;font-weight:600}.down{color:#b3261e;font-weight:600}
.mono{font-family:ui-monospace,Menlo,Consolas,monospace}.tag{display:inline-block;padding:0 6px;border-radius:4px;background:#eef}
</style></head><body>
<h1>SurfShard <span id="cluster"></span></h1>
<div class="sub">seen from <span id="seen"></span>, updated <span id="updated">never</span> <span id="err" class="down"></span></div>
<h2>Shard map <span id="mapnum" class="tag"></span></h2>
<div class="card"><table id="map"><thead><tr><th>shard</th><th>hash range</th><th>group</th><th>leader</th></tr></thead><tbody></tbody></table></div>
<h2>Groups</h2><div id="groups"></div>
<h2>Block stores</h2>
<div class="card"><table id="stores"><thead><tr><th>store</th><th>address</th><th>state</th><th>blocks</th><th>size</th></tr></thead><tbody></tbody></table></div>
<script>
"use strict";
function esc(s){return String(s===null||s===undefined?"-":s).replace(/[&<>"']/g,function(c){return {"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;","'":"&#39;"}[c];});}
function cell(v,cls){return "<td"+(cls?" class=\\""+cls+"\\"":"")+">"+esc(v)+"</td>";}
function draw(c){
  document.getElementById("cluster").textContent=c.cluster;
  document.getElementById("seen").textContent=c.seen_from;
  document.getElementById("updated").textContent=new Date(c.time*1000).toLocaleTimeString();
  document.getElementById("mapnum").textContent="map "+(c.map.num===null?"?":c.map.num);
  var leaders={};c.groups.forEach(function(g){if(g.kind==="group")leaders[g.gid]=g.leader_address;});
  document.querySelector("#map tbody").innerHTML=c.map.shards.map(function(s){
    return "<tr>"+cell(s.shard)+cell(s.lo+".."+s.hi,"mono")+cell(s.gid||"unassigned")+cell(leaders[s.gid]||"-",leaders[s.gid]?"leader":"down")+"</tr>";}).join("");
  document.getElementById("groups").innerHTML=c.groups.map(function(g){
    var title=g.kind==="group"?"group "+g.gid:g.kind;
    var rows=g.members.map(function(m){
      var cls=m.role==="leader"?"leader":(m.role==="down"||m.role==="crashed"?"down":"");
      var moving=(m.moving||[]).map(function(x){return x.state+" "+x.shard;}).join(", ");
      return "<tr>"+cell(m.name,cls)+cell(m.role,cls)+cell(m.term)+cell(m.commit)+cell(m.applied)+cell(m.lag)+cell(m.shards?m.shards.join(" "):"-")+cell(moving||"-")+"</tr>";}).join("");
    return "<div class=\\"card\\" data-group=\\""+esc(title)+"\\"><b>"+esc(title)+"</b> leader <span class=\\"leader\\">"+esc(g.leader)+"</span>"+
      "<table><thead><tr><th>node</th><th>role</th><th>term</th><th>commit</th><th>applied</th><th>lag</th><th>shards</th><th>moving</th></tr></thead><tbody>"+rows+"</tbody></table></div>";}).join("");
  document.querySelector("#stores tbody").innerHTML=c.nodes.filter(function(n){return n.kind==="blockstore";}).map(function(n){
    var st=n.status||{};
    return "<tr>"+cell(n.name)+cell(n.address,"mono")+cell(n.error?"down":"up",n.error?"down":"leader")+
      cell(st.blocks===undefined?"-":st.blocks)+cell(st.pack_bytes===undefined?"-":(st.pack_bytes/1e6).toFixed(1)+" MB")+"</tr>";}).join("");
  document.getElementById("err").textContent="";
}
function tick(){
  fetch("/cluster",{cache:"no-store"}).then(function(r){return r.json();}).then(draw)
    .catch(function(e){document.getElementById("err").textContent="(no answer: "+e+")";})
    .finally(function(){setTimeout(tick,1000);});
}
tick();
</script></body></html>
"""
