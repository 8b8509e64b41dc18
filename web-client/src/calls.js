// The app's lobby: "Go online", the list of who else is, Call (or, in a call, Invite), a ringing
// dialog with Accept and Decline (and a ring), "Calling…" with Cancel, and what became of a call
// in words. An accepted call is joined as any room.
import { Lobby, tokenGrants } from './client.js';

/**
 * @typedef {object} CallsHooks  What the lobby needs of the app.
 * @property {(room: string, name: string, token: string, label: string) => void} join  join an
 *   accepted call; `label` names it for people ("Call with Bob")
 * @property {() => string | null} currentRoom  the room the app is in, if any
 * @property {(name: string) => boolean} inCurrentRoom  someone of this name is in that room
 * @property {(text: string) => void} say  a status line
 * @property {(err: {code?: string, message?: string} | null) => void} showError
 */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const panel = $('lobby');
const selfLine = $('lobby-self');
const onlineList = $('online-list');
const onlineEmpty = $('online-empty');
const callStatus = $('call-status');
const callText = $('call-text');
const callCancel = $('call-cancel');
const incoming = $('incoming');
const incomingText = $('incoming-text');
const incomingAccept = /** @type {HTMLButtonElement} */ ($('incoming-accept'));
const incomingDecline = /** @type {HTMLButtonElement} */ ($('incoming-decline'));

/** @type {Lobby | null} */
let lobby = null;
/** @type {CallsHooks} */
let hooks;
/** The ring of an incoming call, while it rings. @type {{stop: () => void} | null} */
let ring = null;

/**
 * What became of a call, as people say it.
 * @param {import('./lobby.js').CallEndReason} reason
 * @param {string} name  the other side
 * @param {'outgoing' | 'incoming'} direction
 */
export function callEndedText(reason, name, direction) {
  if (direction === 'incoming') {
    return reason === 'timeout' || reason === 'cancelled' ? `Missed call from ${name}.` : `Call from ${name} ended.`;
  }
  switch (reason) {
    case 'declined':
      return `${name} declined the call.`;
    case 'busy':
      return `${name} is in another call. Try again later.`;
    case 'unavailable':
      return `${name} is no longer online.`;
    case 'timeout':
      return `${name} did not answer.`;
    case 'cancelled':
      return 'Call cancelled.';
    default:
      return 'The call ended.';
  }
}

/** @param {CallsHooks} given */
export function initCalls(given) {
  hooks = given;
  callCancel.addEventListener('click', () => {
    if (lobby?.ringing?.direction === 'outgoing') lobby.cancel(lobby.ringing.callId);
  });
  incomingAccept.addEventListener('click', () => answer(true));
  incomingDecline.addEventListener('click', () => answer(false));
  $('go-offline').addEventListener('click', () => lobby?.leave());
}

/** @param {boolean} accepted */
function answer(accepted) {
  const call = lobby?.ringing;
  if (!lobby || call?.direction !== 'incoming') return;
  if (accepted) lobby.accept(call.callId);
  else lobby.decline(call.callId);
  // The answer's outcome (call_accepted, call_ended) closes the dialog; meanwhile no second click.
  incomingAccept.disabled = incomingDecline.disabled = true;
}

/** True while online. */
export function isOnline() {
  return lobby?.state === 'online';
}

/**
 * Goes online as `name`.
 * @param {string} name
 */
export async function goOnline(name) {
  if (!name || lobby) return;
  hooks.showError(null);
  const current = new Lobby();
  lobby = current;
  // For end-to-end tests and the console.
  Object.assign(window, { __switchboardLobby: current });
  current.on('online', () => render());
  current.on('offline', () => render());
  current.on('calling', () => render());
  current.on('incomingCall', ({ name: caller }) => {
    incomingText.textContent = `${caller} is calling`;
    incomingAccept.disabled = incomingDecline.disabled = false;
    incoming.hidden = false;
    ring?.stop();
    ring = startRing();
    incomingAccept.focus();
    render();
  });
  current.on('callEnded', ({ reason, name: other, direction }) => {
    stopRinging();
    hooks.say(callEndedText(reason, other ?? 'They', direction));
    render();
  });
  current.on('callAccepted', ({ room, token, name: other }) => {
    stopRinging();
    render();
    // An invite into the call we are in: the invitee joins it, nothing to do here.
    if (hooks.currentRoom()?.toLowerCase() === room.toLowerCase()) {
      hooks.say(`${other} accepted and is joining.`);
      return;
    }
    hooks.join(room, current.name ?? '', token, `Call with ${other}`);
  });
  current.on('error', (e) => hooks.showError(e));
  current.on('reconnecting', () => {
    stopRinging();
    render();
    hooks.say('Connection lost. Going online again…');
  });
  current.on('reconnected', () => {
    render();
    hooks.say('Back online.');
  });
  current.on('disconnected', ({ reason }) => {
    if (lobby !== current) return;
    lobby = null;
    stopRinging();
    render();
    if (reason !== 'left') hooks.say('You are offline: the connection to the server was lost.');
  });
  try {
    // A server with API keys mints no tokens for pages: the operator's link carries one with
    // the `lobby` grant.
    await current.connect(location.origin, { name, token: linkToken('lobby') });
  } catch (err) {
    if (lobby === current) lobby = null;
    hooks.showError(/** @type {any} */ (err));
  }
  render();
}

function stopRinging() {
  incoming.hidden = true;
  ring?.stop();
  ring = null;
}

/** Shows who is online, with Call (or Invite, in a call) buttons, and the ringing call. */
export function render() {
  panel.hidden = !isOnline();
  if (!lobby || !isOnline()) return;
  selfLine.textContent = `You are online as ${lobby.name}.`;
  const inRoom = hooks.currentRoom();
  const ringing = lobby.ringing;
  onlineList.replaceChildren(
    ...[...lobby.people.values()]
      .sort((a, b) => a.name.localeCompare(b.name))
      .map((person) => {
        const item = document.createElement('li');
        item.dataset.peerId = person.peerId;
        const who = document.createElement('span');
        // textContent: a name is shown exactly as chosen, never as markup.
        who.textContent = person.name;
        if (inRoom && hooks.inCurrentRoom(person.name)) {
          const here = document.createElement('span');
          here.className = 'muted';
          here.textContent = 'in this call';
          item.append(who, here);
          return item;
        }
        const call = document.createElement('button');
        call.type = 'button';
        call.textContent = inRoom ? 'Invite' : 'Call';
        call.disabled = !!ringing;
        call.addEventListener('click', () => placeCall(person.peerId, inRoom));
        item.append(who, call);
        return item;
      }),
  );
  onlineEmpty.hidden = lobby.people.size > 0;
  callStatus.hidden = ringing?.direction !== 'outgoing';
  if (ringing?.direction === 'outgoing') callText.textContent = `Calling ${ringing.name}…`;
}

/**
 * @param {string} peerId
 * @param {string | null} room  the call we are in, to invite into
 */
async function placeCall(peerId, room) {
  if (!lobby) return;
  try {
    await lobby.call(peerId, room ? { room } : {});
  } catch (err) {
    hooks.showError(/** @type {any} */ (err));
  }
  render();
}

/**
 * A phone's ring (two tones, 1 s on, 2 s off) until stopped. Silent where the page may not play
 * sound yet.
 * @returns {{stop: () => void}}
 */
function startRing() {
  try {
    const audio = new AudioContext();
    const gain = audio.createGain();
    gain.gain.value = 0;
    gain.connect(audio.destination);
    for (const frequency of [440, 480]) {
      const tone = audio.createOscillator();
      tone.frequency.value = frequency;
      tone.connect(gain);
      tone.start();
    }
    const start = audio.currentTime;
    for (let cycle = 0; cycle < 15; cycle++) {
      gain.gain.setValueAtTime(0.1, start + cycle * 3);
      gain.gain.setValueAtTime(0, start + cycle * 3 + 1);
    }
    return { stop: () => void audio.close() };
  } catch {
    return { stop: () => {} };
  }
}

/**
 * The page link's `?token=` when it grants `grant` (a server with API keys mints no tokens for
 * pages: the operator's backend puts one in the link).
 * @param {'lobby'} grant
 * @returns {string | undefined}
 */
export function linkToken(grant) {
  const token = new URLSearchParams(location.search).get('token');
  return token && tokenGrants(token)?.[grant] ? token : undefined;
}
