/*
 * /init of nmvm's minimal Linux guest: a static program with its own
 * _start and raw system calls (no libc), integer-only.
 *
 * It raises eth0, opens an AF_PACKET socket on it and runs the mode named
 * by the kernel command line (unknown `key=value` words reach init as
 * environment variables):
 *
 *   net=echo  count=N            reflect N frames, MACs swapped
 *   net=gen   count=N len=A-B    send N test frames of A..B bytes
 *   net=sink  count=N            receive and verify N test frames
 *   net=exit                     return from main (the kernel panics)
 *
 * It prints `nmvm-linux-init ready: mode=M count=N` once the socket is bound
 * and the link is up, then `nmvm-linux-init: M: rx R tx T bad B`, and
 * resets the VM with reboot(LINUX_REBOOT_CMD_RESTART).
 *
 * Test frames are those of nmvm's vmm/src/frame.rs: Ethernet (broadcast,
 * from eth0's MAC, 0x0800) + IPv4 (10.0.0.1 -> 10.1.0.1, DF, TTL 64) +
 * UDP (1234 -> 1234, checksummed) + seq (u64 LE) + byte i = seq + i.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

/* ---------------------------------------------------------- syscalls --- */

#define SYS_write 1
#define SYS_ioctl 16
#define SYS_nanosleep 35
#define SYS_socket 41
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_bind 49
#define SYS_setsockopt 54
#define SYS_exit 60
#define SYS_reboot 169

static s64 sys6(s64 n, s64 a, s64 b, s64 c, s64 d, s64 e, s64 f)
{
	register s64 r10 __asm__("r10") = d;
	register s64 r8 __asm__("r8") = e;
	register s64 r9 __asm__("r9") = f;
	s64 ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
			   "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

#define sys3(n, a, b, c) sys6(n, (s64)(a), (s64)(b), (s64)(c), 0, 0, 0)

/* The compiler may emit calls to these for struct copies and clears. */
void *memset(void *d, int c, u64 n)
{
	u8 *p = d;

	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

/* ------------------------------------------------------------ output --- */

static char out[256];
static int outlen;

static void flush(void)
{
	if (outlen)
		sys3(SYS_write, 1, out, outlen);
	outlen = 0;
}

static void puts_(const char *s)
{
	while (*s) {
		if (outlen == (int)sizeof(out))
			flush();
		out[outlen++] = *s++;
	}
}

static void putu(u64 v)
{
	char b[24];
	int i = 0;

	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i) {
		char s[2] = { b[--i], 0 };

		puts_(s);
	}
}

static void puterr(const char *what, s64 err)
{
	puts_("nmvm-linux-init: ");
	puts_(what);
	puts_(" failed: errno ");
	putu((u64)-err);
	puts_("\n");
	flush();
}

/* ------------------------------------------------------ environment --- */

static int streq_prefix(const char *s, const char *key)
{
	while (*key)
		if (*s++ != *key++)
			return 0;
	return 1;
}

static const char *getenv_(char **envp, const char *key)
{
	u64 n = 0;

	while (key[n])
		n++;
	for (; *envp; envp++)
		if (streq_prefix(*envp, key))
			return *envp + n;
	return 0;
}

/* Parses a decimal number; *end gets the first byte after it. */
static u64 parse_u(const char *s, const char **end)
{
	u64 v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	if (end)
		*end = s;
	return v;
}

/* --------------------------------------------------- sleep and reset --- */

static void sleep_ms(u64 ms)
{
	s64 ts[2] = { (s64)(ms / 1000), (s64)(ms % 1000) * 1000000 };

	sys3(SYS_nanosleep, ts, 0, 0);
}

static void __attribute__((noreturn)) reset(void)
{
	flush();
	/* reboot(2): LINUX_REBOOT_MAGIC1, MAGIC2, LINUX_REBOOT_CMD_RESTART */
	sys6(SYS_reboot, 0xfee1dead, 672274793, 0x01234567, 0, 0, 0);
	for (;;)
		sys3(SYS_exit, 1, 0, 0);
}

/* ------------------------------------------------------- test frames --- */

#define ETH 14
#define IP 20
#define UDP 8
#define PAYLOAD (ETH + IP + UDP)
#define MIN_LEN 60
#define MAX_LEN 1514

static u64 len_for(u64 seq, u64 min, u64 max)
{
	if (max <= min)
		return min;
	return min + (seq * 97) % (max - min + 1);
}

static u64 sum16(const u8 *p, u64 n)
{
	u64 s = 0;

	for (; n >= 2; p += 2, n -= 2)
		s += (u64)p[0] << 8 | p[1];
	if (n)
		s += (u64)p[0] << 8;
	return s;
}

static u16 fold(u64 s)
{
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (u16)s;
}

/* The UDP checksum of frame f (its checksum field taken as zero). */
static u16 udp_sum(const u8 *f, u64 len)
{
	u64 udp_len = len - ETH - IP;
	u64 s = sum16(f + ETH + 12, 8) + 17 + udp_len;
	u16 c;

	s += sum16(f + ETH + IP, 6) + sum16(f + ETH + IP + 8, udp_len - 8);
	c = (u16)~fold(s);
	return c ? c : 0xffff;
}

static void put16(u8 *p, u64 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

static void build(u8 *f, u64 len, u64 seq, const u8 *mac)
{
	static const u8 ip_head[12] = { 0x45, 0x10, 0, 0, 0, 0,
					0x40, 0, 64, 17, 0, 0 };
	static const u8 addrs[8] = { 10, 0, 0, 1, 10, 1, 0, 1 };
	u8 *ip = f + ETH, *udp = f + ETH + IP;
	u64 i;

	for (i = 0; i < 6; i++) {
		f[i] = 0xff;
		f[6 + i] = mac[i];
	}
	put16(f + 12, 0x0800);
	for (i = 0; i < 12; i++)
		ip[i] = ip_head[i];
	for (i = 0; i < 8; i++)
		ip[12 + i] = addrs[i];
	put16(ip + 2, len - ETH);
	put16(ip + 10, (u16)~fold(sum16(ip, IP)));
	put16(udp, 1234);
	put16(udp + 2, 1234);
	put16(udp + 4, len - ETH - IP);
	put16(udp + 6, 0);
	for (i = 0; i < 8; i++)
		f[PAYLOAD + i] = (u8)(seq >> (8 * i));
	for (i = 8; PAYLOAD + i < len; i++)
		f[PAYLOAD + i] = (u8)((u8)seq + (u8)i);
	put16(udp + 6, udp_sum(f, len));
}

/* Like frame.rs's verify(): 0 and *seq if f is an intact test frame. */
static int verify(const u8 *f, u64 len, u64 *seq)
{
	u64 i, s = 0;

	if (len < PAYLOAD + 8 || len > MAX_LEN)
		return -1;
	if (f[12] != 0x08 || f[13] != 0x00 || f[ETH] != 0x45 ||
	    f[ETH + 9] != 17)
		return -2;
	if (((u64)f[ETH + 2] << 8 | f[ETH + 3]) != len - ETH ||
	    ((u64)f[ETH + IP + 4] << 8 | f[ETH + IP + 5]) != len - ETH - IP)
		return -3;
	if (fold(sum16(f + ETH, IP)) != 0xffff)
		return -4;
	if (udp_sum(f, len) != ((u64)f[ETH + IP + 6] << 8 | f[ETH + IP + 7]))
		return -5;
	for (i = 0; i < 8; i++)
		s |= (u64)f[PAYLOAD + i] << (8 * i);
	for (i = 8; PAYLOAD + i < len; i++)
		if (f[PAYLOAD + i] != (u8)((u8)s + (u8)i))
			return -6;
	*seq = s;
	return 0;
}

/* ------------------------------------------------------------ network --- */

#define AF_PACKET 17
#define SOCK_RAW 3
#define ETH_P_ALL 0x0003
#define SOL_SOCKET 1
#define SO_RCVBUFFORCE 33
#define SO_RCVTIMEO 20
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCGIFHWADDR 0x8927
#define SIOCGIFINDEX 0x8933
#define IFF_UP 0x1
#define PACKET_OUTGOING 4
#define EINTR 4
#define EAGAIN 11
#define ENOBUFS 105

/* How long sink and echo wait for a frame before giving up. */
#define IDLE_SECONDS 30
/*
 * The socket's receive buffer: the default (about 100 frames) overflows
 * when a burst arrives faster than the emulated kernel lets init run.
 */
#define RCVBUF (4 << 20)

struct ifreq {
	char name[16];
	union {
		short flags;
		int ifindex;
		struct {
			u16 family;
			u8 data[14];
		} addr;
	} u;
	u8 pad[8];
};

struct sockaddr_ll {
	u16 family;
	u16 protocol;
	int ifindex;
	u16 hatype;
	u8 pkttype;
	u8 halen;
	u8 addr[8];
};

static int sock;
static u8 mac[6];
static u8 frame[2048];
static u64 rx, tx, bad;

static int if_ioctl(unsigned long req, struct ifreq *ifr, const char *what)
{
	static const char eth0[] = "eth0";
	s64 r;
	int i;

	for (i = 0; i < (int)sizeof(eth0); i++)
		ifr->name[i] = eth0[i];
	r = sys3(SYS_ioctl, sock, req, ifr);
	if (r < 0)
		puterr(what, r);
	return (int)r;
}

static int net_up(void)
{
	struct ifreq ifr = { 0 };
	struct sockaddr_ll sll = { 0 };
	s64 tv[2] = { IDLE_SECONDS, 0 };
	int rcvbuf = RCVBUF;
	s64 r;
	int ifindex, i;

	r = sys3(SYS_socket, AF_PACKET, SOCK_RAW, __builtin_bswap16(ETH_P_ALL));
	if (r < 0) {
		puterr("socket(AF_PACKET)", r);
		return -1;
	}
	sock = (int)r;
	if (if_ioctl(SIOCGIFINDEX, &ifr, "SIOCGIFINDEX eth0") < 0)
		return -1;
	ifindex = ifr.u.ifindex;
	if (if_ioctl(SIOCGIFHWADDR, &ifr, "SIOCGIFHWADDR eth0") < 0)
		return -1;
	for (i = 0; i < 6; i++)
		mac[i] = ifr.u.addr.data[i];
	if (if_ioctl(SIOCGIFFLAGS, &ifr, "SIOCGIFFLAGS eth0") < 0)
		return -1;
	ifr.u.flags |= IFF_UP;
	if (if_ioctl(SIOCSIFFLAGS, &ifr, "SIOCSIFFLAGS eth0") < 0)
		return -1;

	sll.family = AF_PACKET;
	sll.protocol = __builtin_bswap16(ETH_P_ALL);
	sll.ifindex = ifindex;
	r = sys3(SYS_bind, sock, &sll, sizeof(sll));
	if (r < 0) {
		puterr("bind(eth0)", r);
		return -1;
	}
	r = sys6(SYS_setsockopt, sock, SOL_SOCKET, SO_RCVTIMEO, (s64)tv,
		 sizeof(tv), 0);
	if (r < 0)
		puterr("setsockopt(SO_RCVTIMEO)", r);
	r = sys6(SYS_setsockopt, sock, SOL_SOCKET, SO_RCVBUFFORCE,
		 (s64)&rcvbuf, sizeof(rcvbuf), 0);
	if (r < 0)
		puterr("setsockopt(SO_RCVBUFFORCE)", r);
	return 0;
}

/* Receives one incoming frame into `frame`; its length, or < 0. */
static s64 recv_frame(void)
{
	for (;;) {
		struct sockaddr_ll from;
		u32 fromlen = sizeof(from);
		s64 n = sys6(SYS_recvfrom, sock, (s64)frame, sizeof(frame), 0,
			     (s64)&from, (s64)&fromlen);

		if (n == -EINTR)
			continue;
		if (n < 0) {
			if (n == -EAGAIN)
				puts_("nmvm-linux-init: no frame for 30 s, giving up\n");
			else
				puterr("recvfrom", n);
			return n;
		}
		if (from.pkttype != PACKET_OUTGOING)
			return n;
	}
}

/* Sends frame[..len], waiting while the device queue is full. */
static int send_frame(u64 len)
{
	for (;;) {
		s64 r = sys6(SYS_sendto, sock, (s64)frame, (s64)len, 0, 0, 0);

		if (r == (s64)len)
			return 0;
		if (r == -ENOBUFS || r == -EAGAIN || r == -EINTR) {
			sleep_ms(1);
			continue;
		}
		if (r < 0)
			puterr("sendto", r);
		return -1;
	}
}

static void gen(u64 count, u64 min, u64 max)
{
	u64 seq;

	for (seq = 0; seq < count; seq++) {
		u64 len = len_for(seq, min, max);

		build(frame, len, seq, mac);
		if (send_frame(len) < 0) {
			bad++;
			break;
		}
		tx++;
	}
}

static void sink(u64 count)
{
	u64 expected = 0, seq;

	while (rx < count) {
		s64 n = recv_frame();

		if (n < 0)
			break;
		rx++;
		if (verify(frame, (u64)n, &seq) < 0) {
			bad++;
			continue;
		}
		if (rx > 1 && seq != expected)
			bad++;
		expected = seq + 1;
	}
}

static void echo(u64 count)
{
	while (rx < count) {
		s64 n = recv_frame();
		int i;

		if (n < 0)
			break;
		rx++;
		for (i = 0; i < 6; i++) {
			u8 t = frame[i];

			frame[i] = frame[6 + i];
			frame[6 + i] = t;
		}
		if (send_frame((u64)n) < 0) {
			bad++;
			break;
		}
		tx++;
	}
}

/* --------------------------------------------------------------- main --- */

static int main(char **envp)
{
	const char *mode = getenv_(envp, "net=");
	const char *s;
	u64 count = 100, min = MIN_LEN, max = MAX_LEN;
	int m;

	if ((s = getenv_(envp, "count=")))
		count = parse_u(s, 0);
	if ((s = getenv_(envp, "len="))) {
		min = parse_u(s, &s);
		max = *s == '-' ? parse_u(s + 1, 0) : min;
		if (min < MIN_LEN)
			min = MIN_LEN;
		if (max > MAX_LEN)
			max = MAX_LEN;
		if (max < min)
			max = min;
	}
	if (!mode)
		mode = "echo";
	if (streq_prefix(mode, "exit") && !mode[4]) {
		puts_("nmvm-linux-init ready: mode=exit count=0\n");
		puts_("nmvm-linux-init: exit: returning from init\n");
		flush();
		return 0;
	}
	if (streq_prefix(mode, "echo") && !mode[4])
		m = 'e';
	else if (streq_prefix(mode, "gen") && !mode[3])
		m = 'g';
	else if (streq_prefix(mode, "sink") && !mode[4])
		m = 's';
	else {
		puts_("nmvm-linux-init: unknown mode net=");
		puts_(mode);
		puts_(" (echo, gen, sink or exit)\n");
		reset();
	}

	if (net_up() < 0)
		reset();
	if (m == 'g')
		sleep_ms(200); /* the first frames after link-up can be lost */
	puts_("nmvm-linux-init ready: mode=");
	puts_(mode);
	puts_(" count=");
	putu(count);
	puts_("\n");
	flush();

	if (m == 'g')
		gen(count, min, max);
	else if (m == 's')
		sink(count);
	else
		echo(count);

	puts_("nmvm-linux-init: ");
	puts_(mode);
	puts_(": rx ");
	putu(rx);
	puts_(" tx ");
	putu(tx);
	puts_(" bad ");
	putu(bad);
	puts_("\n");
	reset();
}

/* The kernel starts init with argc, argv[], NULL, envp[], NULL on the stack. */
void __attribute__((noreturn, used)) start_c(u64 *sp)
{
	u64 argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);

	sys3(SYS_exit, main(envp), 0, 0);
	for (;;)
		;
}

__asm__(".globl _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");
