// The gateway's live dashboard. It reads GET /dashboard/events (server-sent events, one
// "status" event a second) with fetch(), because EventSource cannot send the admin key,
// and draws each status it receives. No libraries; nothing is fetched from elsewhere.
'use strict';

const EVENTS = 'dashboard/events';  // relative to /dashboard, so a path prefix still works
const KEY = 'gateway-admin-key';    // in sessionStorage: forgotten when the tab closes
const RETRY_MS = 2000;
const STALE_MS = 5000;              // nothing received for this long (pings included): reconnect
const HISTORY_S = 300;              // the charts' longest time span
const SHORTEST_S = 60;              // and their shortest, while the history is younger
const GAP_S = 3;                    // a longer pause between events breaks a chart's line
const RECENT_ROWS = 25;
const SVG_NS = 'http://www.w3.org/2000/svg';

const history = [];  // {time, traffic} of each event, oldest first
let running = false;

// ---- DOM helpers and formatting

const $ = (selector) => document.querySelector(selector);

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== '')
    .map((c) => (c instanceof Node ? c : String(c))));
  return node;
}
const el = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);
const svg = (tag, attrs = {}, ...children) =>
  build(document.createElementNS(SVG_NS, tag), attrs, children);
const fillTable = (selector, items, row) =>
  $(`${selector} tbody`).replaceChildren(...items.map(row));

const clip = (text, chars) => (text.length > chars ? `${text.slice(0, chars - 1)}…` : text);
const clock = (seconds) =>
  (seconds ? new Date(seconds * 1000).toLocaleTimeString([], {hour12: false}) : '');

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function number(value, unit) {
  if (value === null || value === undefined) return '–';
  if (unit === '%') return `${Math.round(value * 100)} %`;
  return `${value >= 100 ? Math.round(value) : Number(value.toFixed(1))} ${unit}`;
}

// ---- the connection

async function run() {
  if (running) return;
  running = true;
  try {
    for (;;) {
      const outcome = await listen().catch((err) => {
        console.warn('dashboard: the status stream failed:', err);
        return 'failed';
      });
      if (outcome === 'refused') return;  // the key form starts it again
      setLive('disconnected');
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  } finally {
    running = false;
  }
}

// One connection to the events; how it ended: 'refused', 'failed' or 'ended'.
async function listen() {
  const key = sessionStorage.getItem(KEY);
  const controller = new AbortController();
  let timer = 0;
  const alive = () => {
    clearTimeout(timer);
    timer = setTimeout(() => controller.abort(), STALE_MS);
  };
  alive();
  try {
    const response = await fetch(EVENTS, {headers: key ? {Authorization: `Bearer ${key}`} : {},
                                          cache: 'no-store', signal: controller.signal});
    if (response.status === 401) {
      await response.body?.cancel();
      askForKey(key);
      return 'refused';
    }
    if (!response.ok || !response.body) return 'failed';
    lock(false);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const feed = eventParser(onEvent);
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return 'ended';
      alive();
      feed(value);
    }
  } finally {
    clearTimeout(timer);
  }
}

// Server-sent events: "field: value" lines, a blank line ends an event, ":" lines are
// comments (pings). A "\r" ending a chunk waits for the next chunk to show whether a "\n"
// follows it, so a "\r\n" split between chunks is one line end, not two.
function eventParser(dispatch) {
  let rest = '', type = '', data = [];
  return (chunk) => {
    const lines = (rest + chunk).split(/\r\n|\r(?!$)|\n/);
    rest = lines.pop();
    for (const line of lines) {
      if (line === '') {
        if (data.length) dispatch(type || 'message', data.join('\n'));
        [type, data] = ['', []];
      } else if (!line.startsWith(':')) {
        const at = line.indexOf(':');
        const field = at < 0 ? line : line.slice(0, at);
        const value = at < 0 ? '' : line.slice(at + 1).replace(/^ /, '');
        if (field === 'event') type = value;
        else if (field === 'data') data.push(value);
      }
    }
  };
}

function onEvent(type, data) {
  if (type !== 'status') return;
  try {
    show(JSON.parse(data));
  } catch (err) {
    console.error('dashboard: cannot show the status:', err);
  }
}

function setLive(state) {
  $('#status-live').textContent = $('#status-live').dataset.state = state;
}

// The key form: shown (with a message) while the gateway wants an admin key.
function lock(locked, message = '') {
  document.body.classList.toggle('locked', locked);
  $('#login').hidden = !locked;
  $('#login-error').textContent = message;
}

function askForKey(refusedKey) {
  sessionStorage.removeItem(KEY);
  setLive('needs admin key');
  lock(true, refusedKey ? 'The gateway refused that key.' : '');
  $('#admin-key').focus();
}

function submitKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $('#admin-key').value.trim());
  $('#admin-key').value = '';
  lock(true, 'Checking…');
  run();
}

// ---- the panels

function show(s) {
  setLive('live');
  $('#version').textContent = `v${s.version}`;
  $('#uptime').textContent = duration(s.uptime_s);
  $('#ready').textContent = s.ready ? 'ready' : 'not ready';
  $('#ready').dataset.state = s.ready ? 'up' : 'down';
  showAttention(s);
  showFleet(s);
  showAliases(s.aliases || {});
  history.push({time: s.time, traffic: s.traffic});
  while (history[0].time < s.time - HISTORY_S) history.shift();
  drawCharts(s.time);
  showRecent(s.recent || []);
  showHealing(s.healing || []);
}

function showAttention(s) {
  const firing = (s.alerts && s.alerts.firing) || [];
  $('#alerts').dataset.count = firing.length;
  $('#alerts').replaceChildren(
    firing.length ? el('h2', {}, `Open alerts: ${firing.length}`)
      : el('p', {class: 'muted'}, 'No open alerts.'),
    ...firing.map((a) => el('div', {class: 'alert', 'data-rule': a.rule,
                                    'data-target': a.target, 'data-severity': a.severity},
      el('b', {}, a.severity), ` ${a.rule}`, a.target ? ` on ${a.target}` : '',
      `: ${a.summary} `, el('span', {class: 'muted'}, `since ${clock(a.started)}`))));
  $('#warnings').replaceChildren(...(s.warnings || []).map((w) => el('li', {}, w)));
}

function showAliases(aliases) {
  fillTable('#aliases', Object.entries(aliases), ([alias, pick]) => el('tr', {'data-alias': alias},
    el('td', {}, alias),
    pick ? el('td', {}, `${pick.model} @ ${pick.backend}`)
      : el('td', {class: 'none'}, 'nothing available'),
    el('td', {class: 'muted'}, pick ? pick.why.replace(`${alias}: `, '') : '')));
}

function showRecent(recent) {
  fillTable('#recent', recent.slice(0, RECENT_ROWS), (r) => el('tr', {
    'data-id': r.id, 'data-status': r.status, class: r.status >= 400 ? 'failed' : null},
    el('td', {}, clock(r.time)), el('td', {}, r.door),
    el('td', {}, r.model, ' → ', el('b', {class: 'served'}, r.served || '–')),
    el('td', {}, r.backend || '–'), el('td', {class: 'num'}, r.attempts),
    el('td', {title: r.error || ''}, r.error ? `${r.route}: ${r.error}` : r.route),
    el('td', {class: 'num'}, r.status),
    el('td', {class: 'num', title: r.ttft_ms != null ? `first token ${r.ttft_ms} ms` : ''},
       r.ms)));
}

function showHealing(healing) {
  fillTable('#healing', healing.slice(0, 20), (h) => el('tr', {'data-action': h.action},
    el('td', {}, clock(h.at)), el('td', {}, h.action), el('td', {}, h.target),
    el('td', {title: h.detail}, h.outcome, el('span', {class: 'muted'}, ` ${h.detail || ''}`))));
}

// ---- charts of the traffic in the events received (the last HISTORY_S seconds at most)

function drawCharts(now) {
  const span = Math.min(HISTORY_S, Math.max(SHORTEST_S, now - history[0].time));
  const last = history[history.length - 1].traffic;
  for (const figure of document.querySelectorAll('#charts figure')) {
    const {chart: field, unit} = figure.dataset;
    const points = history.filter((p) => p.traffic && p.traffic[field] != null)
      .map((p) => [p.time, p.traffic[field]]);
    figure.querySelector('b').textContent = number(last ? last[field] : null, unit);
    const canvas = figure.querySelector('canvas');
    canvas.dataset.points = points.length;
    drawChart(canvas, points, now - span, span, unit);
  }
}

function drawChart(canvas, points, start, span, unit) {
  const ratio = window.devicePixelRatio || 1;
  const [w, h] = [canvas.clientWidth, canvas.clientHeight];
  if (canvas.width !== Math.round(w * ratio)) canvas.width = Math.round(w * ratio);
  if (canvas.height !== Math.round(h * ratio)) canvas.height = Math.round(h * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const top = unit === '%' ? 1 : roundUp(Math.max(0, ...points.map((p) => p[1])));
  ctx.fillStyle = getComputedStyle(document.body).getPropertyValue('--muted');
  ctx.font = '10px system-ui, sans-serif';
  ctx.fillText(number(top, unit), 2, 10);
  ctx.fillText(span < 120 ? `${Math.round(span)} s ago` : `${Math.round(span / 60)} min ago`,
               2, h - 3);
  ctx.fillRect(0, h - 14, w, 1);
  if (!points.length) ctx.fillText('no data', w / 2 - 16, h / 2);
  const at = ([t, v]) => [(t - start) / span * (w - 2) + 1, h - 15 - (v / top) * (h - 30)];
  ctx.strokeStyle = ctx.fillStyle = getComputedStyle(canvas).color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach((p, i) => {
    const [x, y] = at(p);
    const joined = i > 0 && p[0] - points[i - 1][0] <= GAP_S;
    if (joined) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
    if (!joined && !(i + 1 < points.length && points[i + 1][0] - p[0] <= GAP_S)) {
      ctx.fillRect(x - 1.5, y - 1.5, 3, 3);  // a point with no neighbour: a dot
    }
  });
  ctx.stroke();
}

// A chart's top: the largest value rounded up to 1, 2 or 5 times a power of ten.
function roundUp(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((m) => m >= value);
}

$('#login').addEventListener('submit', submitKey);
run();
