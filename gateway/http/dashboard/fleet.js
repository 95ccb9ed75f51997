// The dashboard's fleet picture (loaded before app.js, whose helpers it uses when called):
// the gateway, the tunnels, and the backends behind them in lanes by tier, each coloured by
// its state, with its models and their breakers.
'use strict';
const TIERS = ['primary', 'server', 'cloud'];
const TIER_TITLES = {primary: 'primary tier: the workstation', server: 'server tier',
                     cloud: 'cloud tier'};
const TUNNEL_STATES = {up: 'up', degraded: 'degraded', connecting: 'degraded',
                       backing_off: 'down', down: 'down'};
// The fleet picture's columns (x, width) and heights, in pixels.
const GATE = {x: 8, w: 120, h: 52};
const TUNNEL = {x: 168, w: 170, h: 44};
const BACKEND = {x: 378, w: 440};
const LANE_X = TUNNEL.x - 12;
const WIDTH = BACKEND.x + BACKEND.w + 8;
const HEAD = 24, ROW = 18, GAP = 10, LANE_HEAD = 24;
let fleetDrawnFrom = '';  // what the picture was last drawn from

// ---- the fleet picture: the gateway, the tunnels, and the backends in lanes by tier

function backendState(name, b, deployments) {
  const broken = (m) => (deployments[`${name}/${m}`] || {breaker: 'closed'}).breaker !== 'closed';
  if (!b.up) return b.absent ? 'absent' : 'down';  // (an optional one not there: no fault)
  return b.error || b.models.some(broken) ? 'degraded' : 'up';
}

const tunnelOf = (b) => (b && b.tunnel ? b.tunnel.split('/')[0] : '');

// The lanes, top to bottom, each with its rows: a backend, or a tunnel no backend uses.
// Backends behind one tunnel are kept together so the tunnel can sit beside them.
function lanes(s) {
  const tiers = {};
  for (const [name, b] of Object.entries(s.backends)) (tiers[b.tier] ||= []).push(name);
  const used = new Set(Object.values(s.backends).map(tunnelOf));
  const idle = Object.keys(s.tunnels || {}).filter((t) => !used.has(t));
  if (idle.length) tiers.primary ||= [];
  const order = [...TIERS.filter((t) => tiers[t]),
                 ...Object.keys(tiers).filter((t) => !TIERS.includes(t)).sort()];
  const behind = (name) => tunnelOf(s.backends[name]) || '\uffff';  // direct ones last
  return order.map((tier) => ({tier, rows: [
    ...tiers[tier].sort((a, b) => behind(a).localeCompare(behind(b))).map((n) => ({backend: n})),
    ...(tier === 'primary' ? idle.map((t) => ({tunnel: t})) : [])]}));
}

// Where each lane and row goes, and the middle of each tunnel (beside the rows it serves).
function layout(s) {
  let y = 0;
  const served = {};  // tunnel: the y of each row behind it
  const placed = lanes(s).map(({tier, rows}) => {
    const top = y;
    y += LANE_HEAD;
    const boxes = rows.map((row) => {
      const b = s.backends[row.backend];
      const h = row.tunnel ? TUNNEL.h
        : HEAD + Math.max(1, b.models.length) * ROW + (b.error ? ROW : 0) + 6;
      const tunnel = row.tunnel || tunnelOf(b);
      if (tunnel) (served[tunnel] ||= []).push(y + (row.tunnel ? h / 2 : HEAD / 2));
      y += h + GAP;
      return {...row, y: y - h - GAP, h};
    });
    y += GAP;
    return {tier, top, height: y - top - GAP, boxes};
  });
  const tunnelY = Object.fromEntries(Object.entries(served).map(
    ([name, ys]) => [name, ys.reduce((a, b) => a + b, 0) / ys.length]));
  return {lanes: placed, tunnelY, height: Math.max(y, GATE.h + 2 * GAP)};
}

function showFleet(s) {
  const drawnFrom = JSON.stringify([s.ready, s.tunnels, s.backends, Object.entries(
    s.deployments).map(([k, d]) => [k, d.breaker, d.in_flight, d.queued,
                                    d.rate_limited_s > 0])]);
  if (drawnFrom === fleetDrawnFrom) return;  // redrawn only when something shown changed
  fleetDrawnFrom = drawnFrom;
  const {lanes: placed, tunnelY, height} = layout(s);
  const gateY = height / 2;
  const links = svg('g', {class: 'links'});
  const link = (x1, y1, x2, y2, state) => links.append(svg('path', {class: `link ${state}`,
    d: `M${x1} ${y1} C${(x1 + x2) / 2} ${y1} ${(x1 + x2) / 2} ${y2} ${x2} ${y2}`}));
  const picture = svg('svg', {width: WIDTH, height, viewBox: `0 0 ${WIDTH} ${height}`,
                              class: 'fleet'});
  for (const {tier, top, height: laneHeight, boxes} of placed) {
    const lane = picture.appendChild(svg('g', {'data-tier': tier},
      svg('rect', {class: 'lane', x: LANE_X, y: top, width: WIDTH - LANE_X,
                   height: laneHeight, rx: 4}),
      svg('text', {class: 'lane-title', x: BACKEND.x, y: top + 16},
          TIER_TITLES[tier] || `${tier} tier`)));
    for (const box of boxes.filter((row) => row.backend)) {
      const b = s.backends[box.backend];
      const state = backendState(box.backend, b, s.deployments);
      const from = tunnelOf(b) ? [TUNNEL.x + TUNNEL.w, tunnelY[tunnelOf(b)]]
        : [GATE.x + GATE.w, gateY];
      link(...from, BACKEND.x, box.y + HEAD / 2, state);
      lane.append(backendNode(box.backend, b, s.deployments, state, box));
    }
  }
  picture.append(links);
  for (const [name, y] of Object.entries(tunnelY)) {
    const t = (s.tunnels || {})[name] || {state: 'down', error: 'no such tunnel'};
    link(GATE.x + GATE.w, gateY, TUNNEL.x, y, TUNNEL_STATES[t.state] || 'down');
    picture.append(tunnelNode(name, t, y - TUNNEL.h / 2));
  }
  picture.append(gatewayNode(s, gateY - GATE.h / 2));
  $('#fleet').replaceChildren(picture);
}

// A box with a name and a state under it (the gateway, a tunnel).
function smallNode(attrs, {x, w, h}, y, name, stateText, about) {
  return svg('g', {class: `node ${attrs['data-state']}`, ...attrs},
    svg('title', {}, about.filter(Boolean).join('\n')),
    svg('rect', {x, y, width: w, height: h, rx: 6}),
    svg('text', {x: x + 10, y: y + h / 2 - 4, class: 'name'}, clip(name, 22)),
    svg('text', {x: x + 10, y: y + h / 2 + 13, class: 'state'}, stateText));
}

function gatewayNode(s, y) {
  return smallNode({'data-node': 'gateway', 'data-state': s.ready ? 'up' : 'down'}, GATE, y,
                   'gateway', s.ready ? 'ready' : 'not ready', [`version ${s.version}`]);
}

function tunnelNode(name, t, y) {
  const forwards = Object.entries(t.forwards || {}).map(([f, port]) => `${f} :${port}`);
  return smallNode({'data-tunnel': name, 'data-state': TUNNEL_STATES[t.state] || 'down',
                    'data-tunnel-state': t.state}, TUNNEL, y, name,
                   `tunnel ${t.state.replace('_', ' ')}`,
                   [`tunnel ${name}: ${t.state}`, t.since ? `since ${clock(t.since)}` : '',
                    `reconnects ${t.reconnects || 0}`, forwards.join(', '), t.error, t.hint]);
}

function backendNode(name, b, deployments, state, box) {
  const {x, w} = BACKEND;
  const about = [`${name}: ${b.kind}, ${b.tier} tier`, b.tunnel ? `through ${b.tunnel}` : '',
                 `${state} since ${clock(b.since)}`, b.error];
  const node = svg('g', {class: `node ${state}`, 'data-backend': name, 'data-state': state,
                         'data-kind': b.kind},
    svg('title', {}, about.filter(Boolean).join('\n')),
    svg('rect', {x, y: box.y, width: w, height: box.h, rx: 6}),
    svg('text', {x: x + 10, y: box.y + 17, class: 'name'}, clip(name, 30),
        svg('tspan', {class: 'kind', dx: 8}, b.kind)),
    svg('text', {x: x + w - 10, y: box.y + 17, class: 'state', 'text-anchor': 'end'}, state));
  let y = box.y + HEAD + 13;
  for (const model of b.models) {
    node.append(modelRow(`${name}/${model}`, model, deployments[`${name}/${model}`], y));
    y += ROW;
  }
  if (!b.models.length) {
    node.append(svg('text', {x: x + 26, y, class: 'muted'}, 'no models listed'));
    y += ROW;
  }
  if (b.error) node.append(svg('text', {x: x + 10, y, class: 'error'}, clip(b.error, 64)));
  return node;
}

// A model of a backend: its deployment's breaker and requests in flight.
function modelRow(id, model, d, y) {
  const {x, w} = BACKEND;
  const breaker = d ? d.breaker : 'none';
  const note = d ? `${breaker.replace('_', '-')} · ${d.in_flight} in flight`
    + (d.queued ? ` · ${d.queued} queued` : '')
    + (d.rate_limited_s ? ' · rate-limited' : '') : 'no deployment';
  return svg('g', {class: `model breaker-${breaker}`, 'data-deployment': id,
                   'data-breaker': breaker, 'data-in-flight': d ? d.in_flight : 0},
    svg('title', {}, d && d.latency_ms != null ? `${model}: ${d.latency_ms} ms` : model),
    svg('circle', {cx: x + 16, cy: y - 4, r: 4}),
    svg('text', {x: x + 26, y}, clip(model, Math.floor((w - 40) / 6.5) - note.length)),
    svg('text', {x: x + w - 10, y, class: 'note', 'text-anchor': 'end'}, note));
}
