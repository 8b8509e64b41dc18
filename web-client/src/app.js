// The Switchboard demo page: a join form and a grid of participant tiles.
import { Room } from './client.js';

/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */

/**
 * @typedef {object} Tile
 * @property {HTMLElement} el
 * @property {HTMLVideoElement} video
 * @property {HTMLAudioElement | null} audio
 * @property {HTMLElement} label
 * @property {Map<string, RemoteTrack>} tracks  by publicationId
 */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const form = /** @type {HTMLFormElement} */ ($('join-form'));
const roomInput = /** @type {HTMLInputElement} */ ($('room'));
const nameInput = /** @type {HTMLInputElement} */ ($('name'));
const grid = $('grid');
const errorBox = $('error');
const statusLine = $('status');
const controls = $('controls');
const micButton = $('mic');
const cameraButton = $('camera');
const chatToggle = $('chat-toggle');
const chatPanel = $('chat');
const chatLog = $('chat-log');
const chatForm = /** @type {HTMLFormElement} */ ($('chat-form'));
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));

/** @type {Room | null} */
let room = null;
/** @type {Map<string, Tile>} remote tiles by peerId */
const tiles = new Map();
/** @type {Tile | null} */
let localTile = null;

const params = new URLSearchParams(location.search);
roomInput.value = params.get('room') ?? '';
nameInput.value = params.get('name') ?? '';

form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  join(roomInput.value.trim(), nameInput.value.trim());
});
micButton.addEventListener('click', () => {
  if (!room) return;
  room.setMicrophoneEnabled(!room.microphoneEnabled);
  renderControls();
});
cameraButton.addEventListener('click', () => {
  if (!room) return;
  room.setCameraEnabled(!room.cameraEnabled);
  renderControls();
});
$('leave').addEventListener('click', () => room?.leave());
chatToggle.addEventListener('click', () => {
  chatPanel.hidden = !chatPanel.hidden;
  chatToggle.textContent = 'Chat';
  chatToggle.setAttribute('aria-pressed', String(!chatPanel.hidden));
  if (!chatPanel.hidden) chatInput.focus();
});
chatForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = chatInput.value.trim();
  if (!room || !text) return;
  room.sendChat(text);
  chatInput.value = '';
});

if (roomInput.value && nameInput.value && params.get('autojoin') === '1') {
  join(roomInput.value.trim(), nameInput.value.trim());
}

/**
 * @param {string} roomName
 * @param {string} name
 */
async function join(roomName, name) {
  if (!roomName || !name) return;
  showError(null);
  setFormEnabled(false);
  statusLine.textContent = `Joining ${roomName}…`;

  const current = new Room();
  room = current;
  // For end-to-end tests and the console.
  Object.assign(window, { __switchboard: current });

  current.on('localStream', (/** @type {MediaStream} */ stream) => {
    localTile = createTile('local', `${name} (you)`, true);
    localTile.video.srcObject = stream;
    playMedia(localTile.video);
  });
  current.on('participantJoined', (p) => {
    ensureTile(p.peerId, p.name);
    renderStatus();
  });
  current.on('participantUpdated', (p) => {
    const tile = tiles.get(p.peerId);
    if (tile) tile.label.textContent = p.name;
  });
  current.on('participantLeft', (p) => {
    tiles.get(p.peerId)?.el.remove();
    tiles.delete(p.peerId);
    renderStatus();
  });
  current.on('trackSubscribed', (/** @type {RemoteTrack} */ t) => {
    const tile = ensureTile(t.peerId, current.participants.get(t.peerId)?.name ?? t.peerId);
    tile.tracks.set(t.publicationId, t);
    renderTileMedia(tile);
  });
  current.on('trackUnsubscribed', (/** @type {RemoteTrack} */ t) => {
    const tile = tiles.get(t.peerId);
    if (!tile || tile.tracks.get(t.publicationId) !== t) return;
    tile.tracks.delete(t.publicationId);
    renderTileMedia(tile);
  });
  current.on('trackMuted', ({ peerId, publicationId, muted }) => {
    const tile = tiles.get(peerId);
    const t = tile?.tracks.get(publicationId);
    if (!tile || !t) return;
    t.muted = muted;
    renderTileMedia(tile);
  });
  current.on('modeChanged', () => renderStatus());
  current.on('chatMessage', (/** @type {import('./client.js').ChatMessage} */ m) => appendChat(m, current));
  current.on('error', (e) => showError(e));
  current.on('reconnecting', () => {
    statusLine.textContent = 'Connection lost. Reconnecting…';
    statusLine.dataset.reconnecting = '';
  });
  current.on('reconnected', () => {
    delete statusLine.dataset.reconnecting;
    showError(null);
    renderStatus();
  });
  current.on('disconnected', ({ reason }) => {
    if (room !== current) return;
    reset();
    statusLine.textContent = reason === 'left' ? 'You left the room.' : `Disconnected: ${reason}`;
  });

  try {
    await current.connect(location.origin, { room: roomName, name });
  } catch (err) {
    if (room !== current) return;
    reset();
    statusLine.textContent = '';
    showError(/** @type {any} */ (err));
    return;
  }
  if (room !== current || current.state !== 'joined') return;
  form.hidden = true;
  controls.hidden = false;
  renderControls();
  renderStatus();
}

/**
 * @param {import('./client.js').ChatMessage} message
 * @param {Room} current
 */
function appendChat(message, current) {
  const item = document.createElement('li');
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = message.peerId === current.participantId ? 'You' : message.name;
  const text = document.createElement('span');
  text.className = 'text';
  // textContent, never innerHTML: a message is shown exactly as typed.
  text.textContent = message.text;
  item.append(who, text);
  item.title = new Date(message.at).toLocaleTimeString();
  chatLog.append(item);
  chatLog.scrollTop = chatLog.scrollHeight;
  if (chatPanel.hidden && message.peerId !== current.participantId) {
    chatToggle.textContent = 'Chat •';
  }
}

function reset() {
  room = null;
  chatLog.replaceChildren();
  chatPanel.hidden = true;
  chatToggle.textContent = 'Chat';
  for (const tile of tiles.values()) tile.el.remove();
  tiles.clear();
  localTile?.el.remove();
  localTile = null;
  form.hidden = false;
  controls.hidden = true;
  setFormEnabled(true);
}

/**
 * @param {string} peerId
 * @param {string} name
 */
function ensureTile(peerId, name) {
  let tile = tiles.get(peerId);
  if (!tile) {
    tile = createTile('remote', name, false);
    tile.el.dataset.peerId = peerId;
    tiles.set(peerId, tile);
  }
  return tile;
}

/**
 * @param {'local' | 'remote'} kind
 * @param {string} name
 * @param {boolean} first  place the tile before the others (the self-view)
 * @returns {Tile}
 */
function createTile(kind, name, first) {
  const el = document.createElement('div');
  el.className = `tile ${kind}`;
  const video = document.createElement('video');
  // Video elements are muted so autoplay is allowed; remote sound plays through <audio>.
  video.muted = true;
  video.autoplay = true;
  video.playsInline = true;
  el.append(video);
  /** @type {HTMLAudioElement | null} */
  let audio = null;
  if (kind === 'remote') {
    audio = document.createElement('audio');
    audio.autoplay = true;
    el.append(audio);
    el.dataset.noVideo = '';
  }
  const label = document.createElement('span');
  label.className = 'label';
  label.textContent = name;
  el.append(label);
  if (first) grid.prepend(el);
  else grid.append(el);
  return { el, video, audio, label, tracks: new Map() };
}

/** @param {Tile} tile */
function renderTileMedia(tile) {
  const all = [...tile.tracks.values()];
  const videos = all.filter((t) => t.kind === 'video');
  const video = videos.find((t) => t.source === 'camera') ?? videos[0];
  const audios = all.filter((t) => t.kind === 'audio');

  setTracks(tile.video, video ? [video.track] : []);
  if (tile.audio) setTracks(tile.audio, audios.map((t) => t.track));

  toggleAttr(tile.el, 'noVideo', !video || video.muted);
  toggleAttr(tile.el, 'micMuted', audios.some((t) => t.source === 'microphone' && t.muted));
}

/**
 * Gives a media element a fresh stream whenever its set of tracks changes.
 * @param {HTMLMediaElement} el
 * @param {MediaStreamTrack[]} tracks
 */
function setTracks(el, tracks) {
  const current = el.srcObject instanceof MediaStream ? el.srcObject.getTracks() : [];
  if (current.length === tracks.length && tracks.every((t) => current.includes(t))) return;
  el.srcObject = tracks.length ? new MediaStream(tracks) : null;
  if (tracks.length) playMedia(el);
}

/** @param {HTMLMediaElement} el */
function playMedia(el) {
  el.play().catch(() => {
    // Autoplay with sound needs a user gesture when the page joined by itself (autojoin).
    statusLine.textContent = 'Click anywhere to enable sound.';
    document.addEventListener(
      'click',
      () => {
        for (const m of grid.querySelectorAll('video, audio')) {
          /** @type {HTMLMediaElement} */ (m).play().catch(() => {});
        }
        renderStatus();
      },
      { once: true },
    );
  });
}

/**
 * @param {HTMLElement} el
 * @param {string} name
 * @param {boolean} on
 */
function toggleAttr(el, name, on) {
  if (on) el.dataset[name] = '';
  else delete el.dataset[name];
}

/** @param {{code?: string, message?: string} | null} err */
function showError(err) {
  if (!err) {
    errorBox.hidden = true;
    errorBox.textContent = '';
    return;
  }
  const code = err.code ? ` (${err.code})` : '';
  errorBox.textContent = `${err.message || 'Something went wrong'}${code}`;
  errorBox.dataset.code = err.code ?? '';
  errorBox.hidden = false;
}

/** @param {boolean} enabled */
function setFormEnabled(enabled) {
  for (const el of form.elements) /** @type {HTMLInputElement} */ (el).disabled = !enabled;
}

function renderStatus() {
  if (!room || room.state !== 'joined') return;
  const others = room.participants.size;
  // Discreet: how media flows is the server's business, but worth a glance when debugging.
  const mode = room.mode === 'mesh' ? 'peer-to-peer' : 'via server';
  const switching = room.switching ? ' (switching)' : '';
  statusLine.textContent = `${room.roomName ?? ''} · ${others + 1} participant${others ? 's' : ''} · ${mode}${switching}`;
  statusLine.dataset.mode = room.mode;
}

function renderControls() {
  if (!room) return;
  const mic = room.microphoneEnabled;
  const cam = room.cameraEnabled;
  micButton.textContent = mic ? 'Mute mic' : 'Unmute mic';
  micButton.setAttribute('aria-pressed', String(mic));
  cameraButton.textContent = cam ? 'Stop camera' : 'Start camera';
  cameraButton.setAttribute('aria-pressed', String(cam));
}
