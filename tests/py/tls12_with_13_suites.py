"""A hand-made TLS 1.2 client for tests/tls.rs (written by this project's hostile review): it
offers TLS 1.3 cipher suites in its list but no supported_versions extension, so it can only
negotiate TLS 1.2, then does a full ECDHE-ECDSA-AES128-GCM handshake and one HTTP/1.1 request.

usage: tls12_with_13_suites.py PORT SNI SUITES_HEX_CSV PATH   (needs the `cryptography` package)
prints "server Finished decrypted: ..." once the handshake is done, then the decrypted response.
"""
import socket, os, struct, hmac, hashlib, sys
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
port=int(sys.argv[1]); sni=sys.argv[2].encode(); suites=[int(x,16) for x in sys.argv[3].split(",")]
path=(sys.argv[4] if len(sys.argv)>4 else "/v12").encode()
def u8(b): return bytes([len(b)])+b
def u16(b): return struct.pack(">H",len(b))+b
def u24(b): return struct.pack(">I",len(b))[1:]+b
def ext(t,b): return struct.pack(">H",t)+u16(b)
cr=os.urandom(32)
exts=ext(0,u16(b"\x00"+u16(sni)))+ext(10,u16(b"\x00\x1d"))+ext(11,u8(b"\x00"))+ext(13,u16(b"\x04\x03\x08\x04\x04\x01"))+ext(16,u16(u8(b"http/1.1")))
body=b"\x03\x03"+cr+u8(b"")+u16(b"".join(struct.pack(">H",s) for s in suites))+u8(b"\x00")+u16(exts)
ch=b"\x01"+u24(body)
s=socket.create_connection(("127.0.0.1",port)); s.settimeout(5)
s.sendall(b"\x16\x03\x01"+u16(ch))
buf=b""
def rec():
    global buf
    while len(buf)<5 or len(buf)<5+struct.unpack(">H",buf[3:5])[0]:
        d=s.recv(65536)
        if not d: raise SystemExit("connection closed by server; buffered=%r"%buf)
        buf+=d
    n=struct.unpack(">H",buf[3:5])[0]; r=(buf[0],buf[5:5+n]); buf=buf[5+n:]; return r
hs=b""; msgs=[]
transcript=ch
while True:
    t,frag=rec()
    if t==21: raise SystemExit("alert %r"%frag.hex())
    assert t==22,t
    hs+=frag
    while len(hs)>=4 and len(hs)>=4+int.from_bytes(hs[1:4],"big"):
        n=int.from_bytes(hs[1:4],"big"); m=hs[:4+n]; hs=hs[4+n:]; msgs.append(m); transcript+=m
    if msgs and msgs[-1][0]==14: break
sh=msgs[0]; ver=sh[4:6]; sr=sh[6:38]; sidlen=sh[38]; suite=sh[39+sidlen:41+sidlen]
print("ServerHello legacy_version=%s cipher=%s"%(ver.hex(),suite.hex()), "messages:",[m[0] for m in msgs])
ske=[m for m in msgs if m[0]==12][0][4:]
assert ske[0]==3; plen=ske[3]; spub=ske[4:4+plen]
priv=X25519PrivateKey.generate(); from cryptography.hazmat.primitives import serialization
cpub=priv.public_key().public_bytes(serialization.Encoding.Raw,serialization.PublicFormat.Raw)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
pms=priv.exchange(X25519PublicKey.from_public_bytes(spub))
def prf(secret,label,seed,n):
    seed=label+seed; a=seed; out=b""
    while len(out)<n:
        a=hmac.new(secret,a,hashlib.sha256).digest(); out+=hmac.new(secret,a+seed,hashlib.sha256).digest()
    return out[:n]
ms=prf(pms,b"master secret",cr+sr,48)
kb=prf(ms,b"key expansion",sr+cr,40); ck,sk,civ,siv=kb[:16],kb[16:32],kb[32:36],kb[36:40]
cke=b"\x10"+u24(u8(cpub)); transcript+=cke
vd=prf(ms,b"client finished",hashlib.sha256(transcript).digest(),12); fin=b"\x14"+u24(vd)
seq=0
def enc(t,pt):
    global seq
    expl=struct.pack(">Q",seq); aad=expl+bytes([t])+b"\x03\x03"+struct.pack(">H",len(pt)); seq+=1
    return bytes([t])+b"\x03\x03"+u16(expl+AESGCM(ck).encrypt(civ+expl,pt,aad))
s.sendall(b"\x16\x03\x03"+u16(cke)+b"\x14\x03\x03\x00\x01\x01"+enc(22,fin))
rseq=0
def dec(t,frag):
    global rseq
    expl=frag[:8]; aad=struct.pack(">Q",rseq)+bytes([t])+b"\x03\x03"+struct.pack(">H",len(frag)-24); rseq+=1
    return AESGCM(sk).decrypt(siv+expl,frag[8:],aad)
t,f=rec(); print("record",t, "(CCS)" if t==20 else f.hex())
t,f=rec(); print("server Finished decrypted:", dec(t,f)[:4].hex())
s.sendall(enc(23,b"GET "+path+b" HTTP/1.1\r\nHost: "+sni+b"\r\nConnection: close\r\n\r\n"))
while True:
    try: t,f=rec()
    except SystemExit as e: break
    if t==23: print(dec(t,f).decode(errors="replace"))
    else: print("rec",t,f[:8].hex()); break
